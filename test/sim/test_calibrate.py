"""Calibration recovers a known performance model from a synthetic result.json shaped like
dualpath.bench.compare_1p1d's (per-request stage records, per-turn replay records)."""

import json

import numpy as np
import pytest

from dualpath.sim.__main__ import main
from dualpath.sim.calibrate import decode_samples, prefill_samples, samples

P = (0.02, 3e-5, 4e-6)  # prefill: s, s per computed token, s per computed token x 1k context
D = (0.008, 4e-4, 2e-5)  # decode step: s, s per running turn, s per 1k context tokens


def synthetic(seed=0):
    rng = np.random.default_rng(seed)
    stage, turns = [], []
    for _ in range(60):
        n = int(rng.integers(2000, 16000))
        cached = int(rng.integers(0, n - 64))
        miss = n - cached
        stage.append({"type": "prefill", "input_len": n, "cached_input_len": cached,
                      "forward_s": P[0] + P[1] * miss + P[2] * miss * n / 1e3})
        stage.append({"type": "decode", "input_len": n, "forward_s": 1.0})
    # decode: groups of k turns decoding over the same window
    t = 0.0
    for g, k in enumerate([1, 2, 4, 8, 3, 6, 5, 7]):
        ctx = rng.integers(2000, 12000, k)
        out = 41
        live_ctx = float(sum(c + out / 2 for c in ctx))
        step = D[0] + D[1] * k + D[2] * live_ctx / 1e3
        for j in range(k):
            turns.append({"agent": j, "turn": g, "prompt_len": int(ctx[j]), "start_s": t,
                          "ttft_s": 0.5, "end_s": t + 0.5 + step * (out - 1),
                          "output_len": out, "cached_tokens": 0, "error": None})
        t += 100.0  # windows never overlap
    return {"snic_gbps": 6.25, "configs": [
        {"config": "off", "offline": {"stage_records": stage, "turn_records": turns}},
        {"config": "on", "offline": {"stage_records": [], "turn_records": turns[:1]}}]}


def test_samples_come_from_the_off_config_only():
    pre, dec, _ = samples([synthetic()], 131072)
    assert len(pre) == 60 and len(dec) == 36
    assert all(m <= n for m, n, _ in pre)
    assert {r for r, _, _ in dec} == {1, 2, 3, 4, 5, 6, 7, 8}


def test_calibration_recovers_the_model(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps(synthetic()))
    out = tmp_path / "perf.json"
    assert main(["calibrate", str(path), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert [m["p0"], m["p1"], m["p2"]] == pytest.approx(P, rel=1e-3)
    assert [m["d0"], m["d1"], m["d2"]] == pytest.approx(D, rel=1e-3)


def test_without_stage_records_prefill_falls_back_to_ttft():
    run = {"turn_records": [{"prompt_len": 1000, "cached_tokens": 500, "ttft_s": 0.3,
                             "start_s": 0, "end_s": 1, "output_len": 2}]}
    (miss, n, s), = prefill_samples(run, 131072, 6.25)
    assert (miss, n) == (500, 1000) and s == pytest.approx(0.3 - 500 * 131072 / 6.25e9)
    assert decode_samples(run) == [(1, 1001.0, 0.7)]


def test_the_kv_send_inside_the_forward_time_is_not_compute():
    run = {"stage_records": [{"type": "prefill", "input_len": 8000, "cached_input_len": 7800,
                              "forward_s": 0.4, "transfer_total_mb": 1024.0,
                              "transfer_speed_gbps": 4.0}]}  # SGLang: MiB, MiB / 1024 / s
    (miss, n, s), = prefill_samples(run, 131072, 6.25)
    assert (miss, n) == (200, 8000) and s == pytest.approx(0.4 - 0.25)


def test_too_few_samples_is_an_error(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"configs": [{"config": "off", "offline": {}}]}))
    assert main(["calibrate", str(path), "--out", str(tmp_path / "p.json")]) == 2
    assert "need >= 3" in capsys.readouterr().err


def test_validate_simulates_each_measured_run(tmp_path, capsys):
    res = {"snic_gbps": 6.25, "decode_pool_tokens": 163840,
           "trace": {"preset": "64k", "scale": 0.05, "initial": 512, "agents": 2,
                     "max_turns": 2, "seed": 0},
           "configs": [{"config": "off", "dual_path": False, "read_side": "pe", "oracle": False,
                        "offline": {"jct_s": 10.0}, "sweep": [{"snic_gbps": 25.0, "jct_s": 8.0}]},
                       {"config": "oracle", "oracle": True, "offline": {"jct_s": 1.0}},
                       {"config": "on", "dual_path": True, "read_side": "shorter",
                        "oracle": False, "offline": {"jct_s": 5.0}}]}
    path, out = tmp_path / "result.json", tmp_path / "validate.json"
    path.write_text(json.dumps(res))
    assert main(["validate", str(path), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["snic_gbps"]) for r in rows] == [("off", 6.25), ("off", 25.0),
                                                             ("on", 6.25)]
    for r in rows:
        assert r["simulated_jct_s"] > 0
        assert r["error"] == pytest.approx((r["simulated_jct_s"] - r["measured_jct_s"])
                                           / r["measured_jct_s"], abs=2e-3)
    text = capsys.readouterr().out
    assert "measured" in text and "PD link 50.00 GB/s: default" in text
    # a run that measured its KV sends is simulated at its own PD link rate
    res["configs"][0]["sweep"][0]["stage_records"] = [
        {"type": "prefill", "transfer_total_mb": mb, "transfer_speed_gbps": g}
        for mb, g in ((2048, 80.0), (1024, 90.0), (50, 1.0), (4096, 100.0))]
    path.write_text(json.dumps(res))
    assert main(["validate", str(path), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["pd_gbps"] == round(90.0 * 2**30 / 1e9, 2)  # SGLang: GiB/s; the sim: GB/s
    assert got["pd_gbps_from"].startswith("the run's own")
    assert main(["validate", str(path), "--compute-nic-gbps", "12", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pd_gbps"] == 12.0


def test_isolated_prompts_and_the_pd_link_rate(tmp_path):
    """PD transfer runs (cold prompts alone on the engine) give the prefill model; the 1P1D
    runs' SGLang-measured KV transfer rates (>= 100 MB) give the PD link."""
    one_p1d = synthetic()
    recs = one_p1d["configs"][0]["offline"]["stage_records"]
    for i, r in enumerate(x for x in recs if x["type"] == "prefill"):
        r.update(transfer_total_mb=50.0 if i % 2 else 500.0, transfer_speed_gbps=4.0 + i % 2)
        r["forward_s"] += r["transfer_total_mb"] / 1024 / r["transfer_speed_gbps"]
    pd_run = {"backends": [{"backend": "nixl", "requests": [
        {"prompt_len": n, "prefill_forward_s": P[0] + P[1] * n + P[2] * n * n / 1e3}
        for n in (4096, 8192, 16384, 32768)]}]}
    pre, _, rates = samples([one_p1d, pd_run], 131072)
    assert [n for n, _, _ in pre] == [4096, 8192, 16384, 32768]  # the isolated ones win
    assert rates and set(rates) == {4.0 * 2**30 / 1e9}  # GB/s; 50 MB sends are too small
    paths = []
    for k, res in enumerate((one_p1d, pd_run)):
        paths.append(tmp_path / f"r{k}.json")
        paths[-1].write_text(json.dumps(res))
    out = tmp_path / "perf.json"
    assert main(["calibrate", *map(str, paths), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert [m["p0"], m["p1"], m["p2"]] == pytest.approx(P, rel=1e-3)
    assert m["pd_gbps"] == round(4.0 * 2**30 / 1e9, 3)
    # without the isolated prompts the per-request records serve, less their KV send
    pre, _, _ = samples([one_p1d], 131072)
    assert len(pre) == 60
    assert all(sec == pytest.approx(P[0] + P[1] * miss + P[2] * miss * n / 1e3)
               for miss, n, sec in pre)
