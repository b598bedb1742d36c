"""The 1P1D cluster's server command lines (what the GPU checks start) and the PD-transfer
summary."""

from pathlib import Path

from dualpath.bench import pd_transfer
from dualpath.bench.pd_cluster import ClusterSpec, server
from dualpath.launch_server import build_parser, sglang_args


def argv(spec, role, tmp_path):
    p = server(spec, role, tmp_path)
    return p.args[2:], p.env  # after "-m dualpath.launch_server"


def test_roles_get_their_pools_gpus_and_backend(tmp_path):
    spec = ClusterSpec(model=Path("m"), root=tmp_path / "kv", decode_max_total_tokens=163840,
                       decode_hicache_ratio=1.25, decode_cuda_graph_max_bs=32, buffer_gb=16)
    pre, pre_env = argv(spec, "prefill", tmp_path)
    dec, dec_env = argv(spec, "decode", tmp_path)
    val = lambda a, f: a[a.index(f) + 1]  # noqa: E731
    assert val(pre, "--max-total-tokens") == "32768" and val(dec, "--max-total-tokens") == "163840"
    assert val(dec, "--hicache-ratio") == "1.25" and val(dec, "--cuda-graph-max-bs") == "32"
    assert "--disable-cuda-graph" in pre and "--disable-cuda-graph" not in dec
    assert val(pre, "--base-gpu-id") == "0" and val(dec, "--base-gpu-id") == "1"
    assert pre_env["CUDA_VISIBLE_DEVICES"] == dec_env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert val(pre, "--disaggregation-transfer-backend") == "nixl"
    ours, _ = argv(ClusterSpec(model=Path("m"), root=tmp_path, pd_backend="dualpath"), "decode",
                   tmp_path)
    assert "--dualpath-pd-engine" in ours and "--disaggregation-transfer-backend" not in ours
    args, cfg = sglang_args(*build_parser().parse_known_args(ours))  # the launcher accepts it
    assert cfg.pd_engine and val(args, "--disaggregation-transfer-backend") == "mooncake"
    g = ClusterSpec(model=Path("m"), root=tmp_path, prefill_cuda_graph="breakable",
                    decode_cuda_graph_max_bs=32)
    gpre, _ = argv(g, "prefill", tmp_path)
    assert val(gpre, "--cuda-graph-backend-prefill") == "breakable"
    assert "--disable-cuda-graph" not in gpre and "--disable-decode-cuda-graph" in gpre
    gargs, _ = sglang_args(*build_parser().parse_known_args(gpre))
    assert val(gargs, "--cuda-graph-backend-prefill") == "breakable"
    assert val(argv(g, "decode", tmp_path)[0], "--cuda-graph-max-bs") == "32"
    stock, _ = argv(ClusterSpec(model=Path("m"), root=tmp_path, prefetch_queue=False),
                    "prefill", tmp_path)
    assert val(stock, "--dualpath-prefetch-queue") == "off"
    assert val(pre, "--mem-fraction-static") == "0.5" and "--dualpath-stack-sample" not in pre
    prof, _ = argv(ClusterSpec(model=Path("m"), root=tmp_path, stack_sample=True,
                               gil_monitor=True, mem_fraction=0.8), "decode", tmp_path)
    assert val(prof, "--dualpath-stack-sample") == str(tmp_path / "stacks_decode.txt")
    assert val(prof, "--mem-fraction-static") == "0.8"
    _, cfg = sglang_args(*build_parser().parse_known_args(prof))
    assert cfg.stack_sample == str(tmp_path / "stacks_decode.txt") and cfg.gil_monitor
    assert "--dualpath-gil-monitor" not in pre
    assert "--dualpath-host-cache-tokens" not in pre
    assert "--dualpath-device-cache-tokens" not in pre
    assert "--dualpath-refetch-host-hits" not in pre
    spec = ClusterSpec(model=Path("m"), root=tmp_path, host_cache_tokens=4096,
                       device_cache_tokens=0, refetch_host_hits=True,
                       async_page_indices=True)
    (p_argv, _), (d_argv, _) = argv(spec, "prefill", tmp_path), argv(spec, "decode", tmp_path)
    assert val(p_argv, "--dualpath-host-cache-tokens") == "4096"
    assert val(p_argv, "--dualpath-device-cache-tokens") == "0"
    assert "--dualpath-host-cache-tokens" not in d_argv  # the prefill's pool only
    assert "--dualpath-device-cache-tokens" not in d_argv
    assert "--dualpath-refetch-host-hits" in p_argv and "--dualpath-refetch-host-hits" not in d_argv
    assert "--dualpath-async-page-indices" in p_argv
    assert sglang_args(*build_parser().parse_known_args(p_argv))[1].device_cache_tokens == 0
    assert "--dualpath-h2d-kernel" not in p_argv
    ours, _ = argv(ClusterSpec(model=Path("m"), root=tmp_path, h2d_kernel="ours"), "prefill",
                   tmp_path)
    assert val(ours, "--dualpath-h2d-kernel") == "ours"
    assert sglang_args(*build_parser().parse_known_args(ours))[1].h2d_kernel == "ours"


def test_pd_transfer_summary_is_per_prompt_length():
    res = {"requests": [
        {"prompt_len": 4096, "ttft_s": 0.2, "prefill_forward_s": 0.1, "decode_transfer_s": 0.05},
        {"prompt_len": 4096, "ttft_s": 0.4, "prefill_forward_s": None, "decode_transfer_s": None},
        {"prompt_len": 16384, "ttft_s": 1.0, "prefill_forward_s": 0.5, "decode_transfer_s": 0.2},
        {"prompt_len": 16384, "phase": "warm", "ttft_s": 0.3, "prefill_forward_s": 0.04,
         "decode_transfer_s": 0.05},
        {"prompt_len": 16384, "phase": "warm", "ttft_s": 0.3, "prefill_forward_s": 0.06,
         "decode_transfer_s": 0.05, "prefill_transfer_s": 0.01}]}
    assert pd_transfer.summarize(res) == {
        4096: {"ttft": 0.3, "fwd": 0.1, "wait": 0.05, "xfer": None, "send": None,
               "sender": None},
        16384: {"ttft": 1.0, "fwd": 0.5, "wait": 0.2, "xfer": 0.05,
                "send": 0.01, "sender": None}}  # warm ones apart


def test_pd_transfer_takes_the_send_time_sglang_logged():
    from dualpath.bench.stage_stats import parse_line

    line = ("ReqTimeStats(rid=r1, input_len=16384, cached_input_len=16320, output_len=1, "
            "attempts=1, type=prefill): bootstrap_duration=1.20ms, queue_duration=5.00ms, "
            "forward_duration=110.00ms, entry_time=1.0, transfer_speed=20.48 GB/s, "
            "transfer_total=2048.00 MB")
    assert pd_transfer.sglang_transfer_s(parse_line(line)) == 0.09766  # MiB / 1024 / GiB/s
    assert pd_transfer.sglang_transfer_s({"transfer_total_mb": 2048.0}) is None


def test_pd_transfer_reads_the_engines_own_times_from_the_log():
    lines = ["[2026-11-27] INFO dualpath.pd_engine: noise",
             "... pd engine: 2048 descriptors, 1073.7 MB to 127.0.0.1:4000: prepare 1.25 ms, "
             "copy 3.50 ms (306.8 GB/s)",
             "... pd engine: 64 descriptors, 1073.7 MB to 127.0.0.1:4000: prepare 0.25 ms, "
             "copy 3.00 ms (357.9 GB/s)"]
    assert pd_transfer.engine_times(lines) == {
        "engine_descriptors": 2112, "engine_mb": 2147.4, "engine_prepare_ms": 1.5,
        "engine_copy_ms": 6.5}
    assert pd_transfer.engine_times(lines[:1]) == {}
    sender = "... INFO dualpath.pd_send: pd send room 77: 12.50 ms from the last chunk queued " \
             "to success (20.00 ms from the first)"
    assert pd_transfer.engine_times(lines + [sender])["sender_ms"] == 12.5
    assert pd_transfer.engine_times([sender]) == {"sender_ms": 12.5}


def test_a_second_slot_gets_its_own_gpu_pair_and_ports(tmp_path):
    """Two clusters on one 4-GPU host (compare_1p1d --parallel-start): slot 1 runs on GPUs 2
    and 3 with ports of its own, and its router points at its own servers."""
    from dualpath.bench.pd_cluster import PDCluster, router, slot_ports

    spec = ClusterSpec(model=Path("m"), root=tmp_path / "kv", slot=1)
    (pre, pre_env), (dec, dec_env) = argv(spec, "prefill", tmp_path), argv(spec, "decode",
                                                                             tmp_path)
    val = lambda a, f: a[a.index(f) + 1]  # noqa: E731
    assert pre_env["CUDA_VISIBLE_DEVICES"] == dec_env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert val(pre, "--base-gpu-id") == "0" and val(dec, "--base-gpu-id") == "1"
    p0, d0, b0, r0 = slot_ports(0)
    p1, d1, b1, r1 = slot_ports(1)
    assert len({p0, d0, b0, r0, p1, d1, b1, r1, p0 + 1000, d0 + 1000, p1 + 1000,
                d1 + 1000}) == 12, "no port shared between slots or with an agent"
    assert val(pre, "--port") == str(p1) and val(dec, "--port") == str(d1)
    assert val(pre, "--disaggregation-bootstrap-port") == str(b1)
    r = router(spec, tmp_path).args
    assert val(r, "--prefill") == f"http://127.0.0.1:{p1}" and val(r, "--port") == str(r1)
    assert r[r.index("--prefill") + 2] == str(b1)
    assert PDCluster(spec, tmp_path).gpus == (2, 3)
    own = ClusterSpec(model=Path("m"), root=tmp_path, slot=1, share_gpus=False)
    assert argv(own, "decode", tmp_path)[1]["CUDA_VISIBLE_DEVICES"] == "3"
    import pytest
    with pytest.raises(ValueError, match="slot"):
        slot_ports(-1)
