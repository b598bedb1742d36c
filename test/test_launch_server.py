"""`python -m dualpath.launch_server`: the SGLang argv and plugin config it builds per role."""

import json

import pytest

from dualpath.config import PluginConfig
from dualpath.launch_server import build_parser, sglang_args


def build(argv):
    ours, rest = build_parser().parse_known_args(argv)
    return sglang_args(ours, rest)


def value(args, flag):
    return args[args.index(flag) + 1]


def test_prefill_gets_the_store_and_hicache_defaults():
    args, cfg = build(["--port", "30010", "--disaggregation-mode", "prefill",
                       "--dualpath-root", "/tmp/kv", "--dualpath-snic-gbps", "6.25"])
    assert cfg.role == "prefill" and cfg.agent_port == 31010 and not cfg.enable_dual_path
    extra = json.loads(value(args, "--hicache-storage-backend-extra-config"))
    assert value(args, "--hicache-storage-backend") == "dynamic"
    assert extra["root"] == "/tmp/kv" and extra["snic_gbps"] == 6.25
    assert "--enable-hierarchical-cache" in args
    assert value(args, "--hicache-mem-layout") == "page_first"
    assert value(args, "--hicache-storage-prefetch-policy") == "wait_complete"
    assert "--disaggregation-decode-enable-radix-cache" not in args
    assert cfg.prefetch_queue is True
    assert "capacity_gb" not in extra  # no cap unless asked


def test_store_capacity_reaches_the_storage_backend():
    args, cfg = build(["--disaggregation-mode", "prefill", "--dualpath-store-capacity-gb", "80"])
    extra = json.loads(value(args, "--hicache-storage-backend-extra-config"))
    assert cfg.store_capacity_gb == 80 and extra["capacity_gb"] == 80
    with pytest.raises(ValueError, match="store_capacity_gb"):
        build(["--disaggregation-mode", "prefill", "--dualpath-store-capacity-gb", "-1"])


def test_decode_gets_the_store_only_with_the_flag():
    plain, _ = build(["--disaggregation-mode", "decode"])
    assert "--hicache-storage-backend" not in plain  # baseline decode: stock
    args, cfg = build(["--disaggregation-mode", "decode", "--enable-dual-path"])
    assert cfg.enable_dual_path and "--disaggregation-decode-enable-radix-cache" in args


def test_user_flags_win_and_prefetch_queue_can_be_stock():
    args, cfg = build(["--disaggregation-mode", "prefill", "--hicache-storage-prefetch-policy",
                       "timeout", "--dualpath-prefetch-queue", "off"])
    assert value(args, "--hicache-storage-prefetch-policy") == "timeout"
    assert args.count("--hicache-storage-prefetch-policy") == 1
    assert cfg.prefetch_queue is False
    assert PluginConfig.from_json(cfg.to_json()) == cfg


def test_stack_sampling_reaches_the_plugin_config():
    _, cfg = build(["--disaggregation-mode", "prefill", "--dualpath-stack-sample",
                    "/tmp/s_{pid}.txt", "--dualpath-stack-sample-hz", "250"])
    assert (cfg.stack_sample, cfg.stack_sample_hz) == ("/tmp/s_{pid}.txt", 250.0)
    _, off = build(["--disaggregation-mode", "prefill"])
    assert off.stack_sample == ""
    with pytest.raises(ValueError, match="stack_sample_hz"):
        PluginConfig(stack_sample_hz=0)
    _, budget = build(["--disaggregation-mode", "prefill", "--dualpath-host-cache-tokens", "0"])
    assert budget.host_cache_tokens == 0 and off.host_cache_tokens == -1
    with pytest.raises(ValueError, match="host_cache_tokens"):
        PluginConfig(host_cache_tokens=-2)
    _, dev = build(["--disaggregation-mode", "prefill", "--dualpath-device-cache-tokens", "0"])
    assert dev.device_cache_tokens == 0 and off.device_cache_tokens == -1
    with pytest.raises(ValueError, match="device_cache_tokens"):
        PluginConfig(device_cache_tokens=-2)
    _, si = build(["--disaggregation-mode", "decode", "--dualpath-switch-interval-ms", "0.5"])
    assert si.switch_interval_ms == 0.5 and off.switch_interval_ms == 0.2
    for bad in (0, -1, 101):
        with pytest.raises(ValueError, match="switch_interval_ms"):
            PluginConfig(switch_interval_ms=bad)
    with pytest.raises(ValueError, match="need prefetch_queue"):  # its hooks apply the budgets
        PluginConfig(device_cache_tokens=0, prefetch_queue=False)
    with pytest.raises(ValueError, match="need prefetch_queue"):
        PluginConfig(refetch_host_hits=True, prefetch_queue=False)
    _, rf = build(["--disaggregation-mode", "prefill", "--dualpath-refetch-host-hits"])
    assert rf.refetch_host_hits and not off.refetch_host_hits
    _, ap = build(["--disaggregation-mode", "prefill", "--dualpath-async-page-indices"])
    assert ap.async_page_indices and not off.async_page_indices


def test_pd_engine_selects_mooncake():
    args, cfg = build(["--disaggregation-mode", "decode", "--dualpath-pd-engine"])
    assert cfg.pd_engine and value(args, "--disaggregation-transfer-backend") == "mooncake"
    with pytest.raises(SystemExit, match="not 'nixl'"):
        build(["--disaggregation-mode", "decode", "--dualpath-pd-engine",
               "--disaggregation-transfer-backend", "nixl"])
    with pytest.raises(SystemExit, match="needs --disaggregation-mode"):
        build(["--dualpath-pd-engine"])


@pytest.mark.parametrize("argv,msg", [
    (["--disaggregation-mode", "both"], "prefill or decode"),
    (["--enable-dual-path"], "needs --disaggregation-mode"),
    (["--disaggregation-mode", "prefill", "--hicache-storage-backend", "file"], "drop"),
    (["--disaggregation-mode", "prefill", "--hicache-mem-layout", "layer_first"], "page_first"),
])
def test_bad_combinations_are_refused(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        build(argv)


def test_non_pd_server_is_left_alone():
    args, cfg = build(["--port", "30000", "--tp", "2"])
    assert args == ["--port", "30000", "--tp", "2"] and cfg.role == ""


def test_print_gives_a_command_for_sglangs_own_launcher(capsys):
    import shlex

    from dualpath.launch_server import main

    main(["--disaggregation-mode", "decode", "--enable-dual-path", "--port", "30020",
          "--dualpath-print"])
    env, *argv = shlex.split(capsys.readouterr().out.strip())  # what a shell would run
    name, raw = env.split("=", 1)
    cfg = PluginConfig.from_json(raw)
    assert name == "DUALPATH_PLUGIN_CONFIG"
    assert cfg.enable_dual_path and cfg.role == "decode" and cfg.agent_port == 31020
    assert argv[1:3] == ["-m", "sglang.launch_server"] and "--enable-hierarchical-cache" in argv
    assert "--dualpath-print" not in argv
