"""Agentic trace generation and readers."""

import json

import pytest

from dualpath.bench.trace import (
    PRESETS,
    TraceShape,
    Trajectory,
    describe,
    generate,
    mooncake_token_ids,
    read_jsonl,
    read_mooncake,
    write_jsonl,
)


def test_seeded_and_reproducible(tmp_path):
    a = generate(PRESETS["32k"], 50, seed=7)
    b = generate(PRESETS["32k"], 50, seed=7)
    assert [t.to_json() for t in a] == [t.to_json() for t in b]
    assert [t.to_json() for t in a] != [t.to_json() for t in generate(PRESETS["32k"], 50, 8)]
    write_jsonl(a, tmp_path / "t.jsonl")
    assert [t.to_json() for t in read_jsonl(tmp_path / "t.jsonl")] == [t.to_json() for t in a]


def test_means_match_the_shape_when_the_cap_does_not_bind():
    shape = TraceShape(max_len=10**9, mean_turns=20, mean_append=500, mean_generate=150,
                       initial_mean=1000)
    d = describe(generate(shape, 3000, seed=1))
    assert d["mean_turns"] == pytest.approx(20, rel=0.08)
    assert d["mean_append"] == pytest.approx(500, rel=0.05)
    assert d["mean_generate"] == pytest.approx(150, rel=0.05)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_max_len_is_never_exceeded(preset):
    shape = PRESETS[preset]
    trajs = generate(shape, 200, seed=2)
    for t in trajs:
        for (_append, gen), prompt in zip(t.turns, t.prompt_lengths(), strict=True):
            assert prompt + gen <= shape.max_len
    d = describe(trajs)
    assert d["max_prompt"] <= shape.max_len and 0.8 < d["reuse_ratio"] < 1
    assert d["mean_turns"] < shape.mean_turns, "Table 2's means exceed MaxLen: the cap binds"


def test_scaled_shape_and_poisson_arrivals():
    small = PRESETS["64k"].scaled(0.25)
    assert small.max_len == 16 * 1024 and small.mean_append == pytest.approx(429 / 4)
    trajs = generate(small, 2000, seed=3, arrival_rate=4.0)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(trajs, trajs[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.08)
    assert all(g >= 0 for g in gaps)


def test_trajectory_prompts_grow_by_append_and_generation():
    t = Trajectory(0, 100, [(10, 5), (20, 7), (1, 1)])
    assert t.prompt_lengths() == [110, 135, 143]  # 100+10 | +5+20 | +7+1


def test_mooncake_reader_and_shared_prefixes(tmp_path):
    p = tmp_path / "mc.jsonl"
    rows = [{"timestamp": 0, "input_length": 1200, "output_length": 10, "hash_ids": [1, 2, 3]},
            {"timestamp": 5, "input_length": 700, "output_length": 4, "hash_ids": [1, 9]}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b = list(read_mooncake(p))
    ia, ib = mooncake_token_ids(a), mooncake_token_ids(b)
    assert len(ia) == 1200 and len(ib) == 700
    assert ia[:512] == ib[:512] and ia[512:700] != ib[512:700]  # block 1 shared, then not
    p.write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="mc.jsonl:1"):
        list(read_mooncake(p))


def test_message_traces_become_trajectories(tmp_path):
    from pathlib import Path

    from dualpath.bench.trace import read_messages

    sample = Path(__file__).resolve().parents[1] / "benchmark/agentic/sample_messages.jsonl"
    trajs = read_messages(sample, count_tokens=lambda t: len(t.split()))
    assert [len(t.turns) for t in trajs] == [3, 1] and trajs[1].arrival_s == 1.5
    # agent 0: system prompt = initial; user -> append; assistant -> generate; tool -> append
    assert trajs[0].initial == 16 and trajs[0].turns[:2] == [(11, 13), (13, 25)]
    assert trajs[1].initial == 1  # no system prompt
    p = tmp_path / "m.jsonl"
    p.write_text('[{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},'
                 ' {"role": "user", "content": "unanswered"}]\n\n')
    (t,) = read_messages(p, count_tokens=lambda s: len(s.split()))
    assert t.turns == [(2, 1)]  # the unanswered tail is dropped
    p.write_text('{"messages": [{"content": "no role"}]}\n')
    with pytest.raises(ValueError, match=":1: not a message trace line"):
        read_messages(p)


def test_convert_cli_with_the_shipped_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from pathlib import Path

    from dualpath.bench.agentic import main
    from dualpath.bench.trace import read_jsonl

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "t.jsonl"
    assert main(["convert", "--messages", str(root / "benchmark/agentic/sample_messages.jsonl"),
                 "--tokenizer", str(root / "configs/models/llama-3.1-8b-dummy"),
                 "--out", str(out)]) == 0
    trajs = read_jsonl(out)
    assert len(trajs) == 2 and all(a > 0 and g > 0 for t in trajs for a, g in t.turns)
