import pytest

from dualpath import env


def test_defaults(monkeypatch):
    for v in env.ALL:
        monkeypatch.delenv(v.name, raising=False)
    assert env.BUILD_CUDA.get() == "auto"
    assert env.CUDA_ARCHS.get() == "90"
    assert env.BUILD_JOBS.get() == 0


@pytest.mark.parametrize("var,raw,expected", [
    (env.BUILD_CUDA, "ON", "on"),
    (env.CUDA_ARCHS, "80, 90a", "80;90a"),
    (env.BUILD_JOBS, "4", 4),
    (env.LOG_LEVEL, "Debug", "debug"),
])
def test_parses(monkeypatch, var, raw, expected):
    monkeypatch.setenv(var.name, raw)
    assert var.get() == expected


@pytest.mark.parametrize("var,raw", [
    (env.BUILD_CUDA, "maybe"),
    (env.CUDA_ARCHS, "hopper"),
    (env.BUILD_JOBS, "-1"),
    (env.BUILD_JOBS, "1GiB"),
    (env.LOG_LEVEL, "loud"),
])
def test_bad_values_raise_naming_the_variable(monkeypatch, var, raw):
    monkeypatch.setenv(var.name, raw)
    with pytest.raises(ValueError, match=var.name):
        var.get()


def test_parse_bool_rejects_unknown_words():
    assert env.parse_bool("On") is True and env.parse_bool("0") is False
    with pytest.raises(ValueError):
        env.parse_bool("enabled")
