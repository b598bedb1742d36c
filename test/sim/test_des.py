"""The cluster simulator: conservation, which node reads what, the storage-bound speed-up and its
disappearance when compute-bound, the paper's scaling shape, online SLOs, the model fits."""

import json

import numpy as np
import pytest

from dualpath.bench.trace import PRESETS, TraceShape, Trajectory, generate
from dualpath.sim.__main__ import main as sim_main
from dualpath.sim.des import simulate
from dualpath.sim.model import PerfModel, SimCluster, fit_decode, fit_prefill

KVB = 131072
FAST = PerfModel(p0=0.001, p1=1e-6, p2=0.0, d0=0.001, d1=0.0, d2=0.0)  # storage-bound
SHAPE = TraceShape(max_len=16384, mean_turns=40, mean_append=300, mean_generate=50,
                   initial_mean=4096)


def trajs(n=64, seed=0, rate=None):
    return generate(SHAPE, n, seed, rate)


def test_every_turn_served_and_every_stored_byte_read_once():
    t = trajs()
    runs = {side: simulate(SimCluster(1, 1, gpus_per_node=2, policy=pol, read_side=side),
                           FAST, t)
            for pol, side in (("basic", "pe"), ("dualpath", "de"), ("dualpath", "split"))}
    totals = {k: r.read_bytes_pe + r.read_bytes_de for k, r in runs.items()}
    assert len(set(totals.values())) == 1 and totals["pe"] > 0, totals
    assert runs["pe"].read_bytes_de == 0 and runs["de"].read_bytes_pe == 0
    assert runs["split"].read_bytes_pe > 0 and runs["split"].read_bytes_de > 0
    n = sum(len(tr.turns) for tr in t)
    assert all(r.turns == n for r in runs.values())


def test_a_prefill_cache_serves_recent_prefixes_without_storage():
    t = trajs(4)
    none = simulate(SimCluster(1, 1, gpus_per_node=1, policy="basic"), FAST, t)
    big = simulate(SimCluster(1, 1, gpus_per_node=1, policy="basic", pe_cache_tokens=10**7),
                   FAST, t)
    small = simulate(SimCluster(1, 1, gpus_per_node=1, policy="basic", pe_cache_tokens=20000),
                     FAST, t)
    # with room for every agent only the tokens decoded since (stored by the decode) are read
    assert none.read_bytes_pe > small.read_bytes_pe > big.read_bytes_pe > 0
    assert big.read_bytes_pe < 0.01 * none.read_bytes_pe
    assert big.jct_s < none.jct_s
    with pytest.raises(ValueError, match="pe_cache_tokens"):
        SimCluster(1, 1, pe_cache_tokens=-1)


def test_storage_bound_speedup_and_its_ceiling():
    t = trajs(128)
    basic = simulate(SimCluster(1, 1, gpus_per_node=4, policy="basic"), FAST, t)
    dual = simulate(SimCluster(1, 1, gpus_per_node=4, read_side="split"), FAST, t)
    speedup = basic.jct_s / dual.jct_s
    assert basic.storage_busy_pe > 0.9  # the baseline saturates the prefill node's NIC
    assert 1.6 < speedup <= 2.05, speedup  # two nodes' NICs instead of one: at most 2x
    assert dual.storage_busy_de > 0.8


def test_no_gain_when_compute_bound():
    slow = PerfModel(p0=0.05, p1=2e-3, p2=0.0, d0=0.001, d1=0.0, d2=0.0)
    t = trajs(64)
    basic = simulate(SimCluster(1, 1, gpus_per_node=2, policy="basic"), slow, t)
    dual = simulate(SimCluster(1, 1, gpus_per_node=2, read_side="split"), slow, t)
    assert basic.prefill_busy > 0.8 and basic.storage_busy_pe < 0.5
    assert 0.9 < basic.jct_s / dual.jct_s < 1.15


def test_scaling_shape_more_nodes_more_agents_similar_jct():
    """The paper's 2P4D vs 48P96D: agents scaled with the cluster keep the JCT (here 1P2D vs
    4P8D with 4x agents)."""
    small = simulate(SimCluster(1, 2, gpus_per_node=2), FAST, trajs(48, seed=1))
    big = simulate(SimCluster(4, 8, gpus_per_node=2), FAST, trajs(192, seed=1))
    assert 0.85 < big.jct_s / small.jct_s < 1.15, (small.jct_s, big.jct_s)


def test_online_slo_drops_with_load():
    lo = simulate(SimCluster(1, 1, gpus_per_node=2, policy="basic"), FAST,
                  trajs(64, rate=0.05), online=True)
    hi = simulate(SimCluster(1, 1, gpus_per_node=2, policy="basic"), FAST,
                  trajs(64, rate=50.0), online=True)
    assert lo.slo_attainment >= hi.slo_attainment and lo.ttft_p90 <= hi.ttft_p90


def test_fits_recover_the_model():
    rng = np.random.default_rng(0)
    miss, ctx = rng.integers(10, 2000, 50), rng.integers(1000, 60000, 50)
    y = 0.02 + 3e-5 * miss + 2e-6 * miss * ctx / 1e3
    assert np.allclose(fit_prefill(miss, ctx, y), (0.02, 3e-5, 2e-6), rtol=1e-6)
    run, dctx = rng.integers(1, 64, 50), rng.integers(1000, 10**6, 50)
    y = 0.01 + 1e-4 * run + 3e-6 * dctx / 1e3
    assert np.allclose(fit_decode(run, dctx, y), (0.01, 1e-4, 3e-6), rtol=1e-6)
    with pytest.raises(ValueError):
        fit_prefill(miss[:2], ctx[:2], y[:2])


def test_a_turn_too_large_for_any_decode_engine_is_an_error():
    t = [Trajectory(0, 5000, [(100, 10)])]
    with pytest.raises(RuntimeError, match="unserved"):
        simulate(SimCluster(1, 1, gpus_per_node=1, decode_kv_tokens=1000), FAST, t)


def test_cli_run_and_model_round_trip(tmp_path, capsys):
    p = tmp_path / "m.json"
    FAST.save(p)
    assert PerfModel.load(p) == FAST
    assert sim_main(["run", "--prefill-nodes", "1", "--decode-nodes", "1", "--agents", "8",
                     "--preset", "32k", "--scale", "0.25", "--gpus-per-node", "2",
                     "--perf", str(p)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["turns"] > 0 and out["jct_s"] > 0 and out["perf"]["p0"] == FAST.p0
    assert PRESETS["32k"].max_len == 32768


def test_a_small_prefill_pool_makes_turns_wait_for_the_pd_transfer():
    """A turn holds its prompt in the prefill's GPU pool until its KV reached the decode: with a
    slow PD link and room for one prompt, prefills no longer overlap other turns' transfers."""
    t = trajs(8)
    slow = {"gpus_per_node": 1, "policy": "basic", "compute_nic_gbps": 2.0, "storage_ratio": 25.0}
    busy = PerfModel(p0=0.5, p1=0.0, p2=0.0, d0=0.001, d1=0.0, d2=0.0)  # ~ a transfer's time
    free = simulate(SimCluster(1, 1, **slow), busy, t)
    tight = simulate(SimCluster(1, 1, prefill_kv_tokens=1, **slow), busy, t)
    assert tight.turns == free.turns and tight.jct_s > 1.2 * free.jct_s
    with pytest.raises(ValueError, match="prefill_kv_tokens"):
        SimCluster(1, 1, prefill_kv_tokens=-1)


def test_given_hits_replace_the_whole_earlier_context():
    t = trajs(4)
    c = SimCluster(1, 1, gpus_per_node=1, policy="basic")
    ideal = simulate(c, FAST, t)
    none = simulate(c, FAST, t, hits={(a, k): 0 for a, tr in enumerate(t)
                                      for k in range(len(tr.turns))})
    assert none.read_bytes_pe == 0 and ideal.read_bytes_pe > 0
    half = simulate(c, FAST, t, hits={(a, k): 1000 for a, tr in enumerate(t)
                                      for k in range(len(tr.turns))})
    n = sum(len(tr.turns) for tr in t)
    assert half.read_bytes_pe == n * (1000 - 1000 % 64) * KVB


def test_prefill_staging_room_limits_loads_in_flight():
    """Reads land in the prefill's host staging until its prefill starts: with room for one
    prefix, the two nodes' NICs no longer read different turns at once."""
    t = trajs(32)
    free = simulate(SimCluster(1, 1, gpus_per_node=1, read_side="shorter"), FAST, t)
    one = simulate(SimCluster(1, 1, gpus_per_node=1, read_side="shorter",
                              prefill_staging_tokens=1), FAST, t)
    assert one.turns == free.turns
    assert one.read_bytes_pe + one.read_bytes_de == free.read_bytes_pe + free.read_bytes_de
    assert one.jct_s > 1.3 * free.jct_s, (one.jct_s, free.jct_s)
    with pytest.raises(ValueError, match="prefill_staging_tokens"):
        SimCluster(1, 1, prefill_staging_tokens=-1)


def test_loads_in_flight_per_prefill_are_limited():
    """A prefill runs at most `prefill_loads` loads at once (its prefetch IO threads): with one,
    the two nodes' NICs no longer read for different turns at the same time."""
    t = trajs(32)
    free = simulate(SimCluster(1, 1, gpus_per_node=1, read_side="shorter"), FAST, t)
    one = simulate(SimCluster(1, 1, gpus_per_node=1, read_side="shorter", prefill_loads=1),
                   FAST, t)
    assert one.turns == free.turns and one.jct_s > 1.3 * free.jct_s, (one.jct_s, free.jct_s)
    with pytest.raises(ValueError, match="prefill_loads"):
        SimCluster(1, 1, prefill_loads=-1)


def test_prefill_hits_set_what_the_prefill_computes_not_what_is_read():
    t = trajs(4)
    slow = PerfModel(p0=0.001, p1=1e-4, p2=0.0, d0=0.001, d1=0.0, d2=0.0)  # compute matters
    c = SimCluster(1, 1, gpus_per_node=1, policy="basic")
    everything = {(a, k): 0 for a, tr in enumerate(t) for k in range(len(tr.turns))}
    base = simulate(c, slow, t)
    recompute = simulate(c, slow, t, prefill_hits=everything)
    assert recompute.read_bytes_pe == base.read_bytes_pe, "the reads are the turns' hits"
    assert recompute.jct_s > base.jct_s and recompute.prefill_busy > base.prefill_busy


def test_measured_prefill_hits_match_stage_records_to_turns_by_prompt_length():
    from dualpath.sim.__main__ import measured_prefill_hits

    run = {"turn_records": [{"agent": 0, "turn": 1, "prompt_len": 900, "start_s": 2.0},
                            {"agent": 1, "turn": 0, "prompt_len": 500, "start_s": 0.0},
                            {"agent": 0, "turn": 0, "prompt_len": 500, "start_s": 0.1}],
           "stage_records": [{"type": "decode", "input_len": 500, "cached_input_len": 7},
                             {"type": "prefill", "input_len": 500, "cached_input_len": 0},
                             {"type": "prefill", "input_len": 500, "cached_input_len": 64},
                             {"type": "prefill", "input_len": 900, "cached_input_len": 448}]}
    assert measured_prefill_hits(run) == {(1, 0): 0, (0, 0): 64, (0, 1): 448}


def test_held_reuse_is_not_read_from_storage():
    """`held`: the part of each turn's stored prefix the prefill found in its own pools. It is
    reused (not computed) without a storage read, so a storage-bound run gets faster."""
    t = trajs(16)
    c = SimCluster(1, 1, gpus_per_node=1, policy="basic")
    base = simulate(c, FAST, t)
    hits = {(a, k): h for a, tr in enumerate(t)
            for k, h in enumerate([0] + [tr.initial] * (len(tr.turns) - 1))}
    half = {k: v // 2 for k, v in hits.items()}
    read_all = simulate(c, FAST, t, hits=hits)
    read_half = simulate(c, FAST, t, hits=hits, held=half)
    assert read_half.read_bytes_pe == pytest.approx(read_all.read_bytes_pe / 2, rel=0.05)
    assert read_half.jct_s < read_all.jct_s <= base.jct_s * 1.01


def test_storage_share_is_what_the_prefetches_loaded_of_the_reuse():
    from dualpath.sim.__main__ import storage_share

    run = {"bytes": {"pe_pf_loaded_tokens": 300},
           "stage_records": [{"type": "prefill", "cached_input_len": 800},
                             {"type": "prefill", "cached_input_len": 200},
                             {"type": "decode", "cached_input_len": 5000}]}
    assert storage_share(run) == 0.3
    assert storage_share({"stage_records": run["stage_records"]}) == 1.0, "no counter: all read"
    assert storage_share({**run, "bytes": {"pe_pf_loaded_tokens": 9e9}}) == 1.0, "at most all"
    # --refetch-host-hits: host hits read again count as read (the tree drops them as
    # duplicates, so they are not in pe_pf_loaded_tokens)
    refetch = {**run, "bytes": {"pe_pf_loaded_tokens": 100, "pe_pf_refetched_tokens": 500}}
    assert storage_share(refetch) == 0.6


def test_batched_prefill_pays_the_per_batch_cost_once():
    """With prefill_batch > 1 the queued turns that fit run as one batch: p0 once. A prefill-
    bound run gets faster; with batches of one nothing changes; bad values raise."""
    t = trajs(16)
    slow = PerfModel(p0=0.2, p1=1e-6, p2=0.0, d0=0.001, d1=0.0, d2=0.0)  # per-batch cost
    one = simulate(SimCluster(1, 1, gpus_per_node=1, policy="basic"), slow, t)
    same = simulate(SimCluster(1, 1, gpus_per_node=1, policy="basic", prefill_batch=1), slow, t)
    eight = simulate(SimCluster(1, 1, gpus_per_node=1, policy="basic", prefill_batch=8), slow, t)
    assert same.jct_s == one.jct_s and eight.turns == one.turns
    assert eight.jct_s < 0.6 * one.jct_s, (eight.jct_s, one.jct_s)
    assert slow.prefill_batch_s([(100, 1000)]) == slow.prefill_s(100, 1000)
    assert slow.prefill_batch_s([(100, 1000)] * 3) == pytest.approx(0.2 + 3 * 1e-4)
    with pytest.raises(ValueError, match="prefill_batch"):
        SimCluster(1, 1, prefill_batch=0)


def test_a_fixed_router_prefill_rate_sets_beta():
    """router_prefill_tokens_per_s fixes the global scheduler's prefill rate: a rate far below
    the engine's holds requests back (beta = rate x window) and the run takes longer."""
    t = trajs(32)
    free = simulate(SimCluster(1, 1, gpus_per_node=1), FAST, t)
    held = simulate(SimCluster(1, 1, gpus_per_node=1, router_prefill_tokens_per_s=200.0), FAST, t)
    assert held.turns == free.turns and held.jct_s > 1.2 * free.jct_s, (held.jct_s, free.jct_s)
    with pytest.raises(ValueError, match="router_prefill_tokens_per_s"):
        SimCluster(1, 1, router_prefill_tokens_per_s=-1)


def test_a_decode_side_plan_reads_the_whole_stored_prefix_even_what_the_prefill_held():
    """With the decode reading (miss-only return), the decode restores the whole stored prefix,
    so it reads the part the prefill found in its own pools too; a prefill-side plan reads
    only what the prefill lacks."""
    t = trajs(8)
    hits = {(a, k): h for a, tr in enumerate(t)
            for k, h in enumerate([0] + [tr.initial] * (len(tr.turns) - 1))}
    half = {k: v // 2 for k, v in hits.items()}
    de = simulate(SimCluster(1, 1, gpus_per_node=1, read_side="de"), FAST, t, hits=hits,
                  held=half)
    pe = simulate(SimCluster(1, 1, gpus_per_node=1, read_side="pe"), FAST, t, hits=hits,
                  held=half)
    stored = sum(v - v % 64 for v in hits.values()) * 131072
    assert de.read_bytes_pe == 0 and de.read_bytes_de == pytest.approx(stored, rel=0.01)
    assert pe.read_bytes_de == 0 and pe.read_bytes_pe == pytest.approx(stored / 2, rel=0.05)


def test_reads_taking_turns_a_batch_each_delay_the_first_request():
    """read_batch_bytes: two turns' reads of two batches each start together on one NIC.
    First come first served (0), the first one's prefix is ready after two batches; taking
    turns, after three: its TTFT grows by a batch's read time, the NIC's work is the same."""
    t = [Trajectory(agent=a, initial=0, turns=[(8192, 1)]) for a in range(2)]
    hits = {(0, 0): 8192 - 64, (1, 0): 8192 - 64}  # 127 pages each
    batch = 64 * 64 * KVB  # 64 pages: two batches a read
    runs = {}
    for rb in (0, batch):
        c = SimCluster(1, 1, gpus_per_node=1, policy="basic", compute_nic_gbps=50.0,
                       storage_ratio=1.0 / 50, read_batch_bytes=rb)  # 1 GB/s storage
        runs[rb] = simulate(c, FAST, t, hits=hits)
    one_batch = batch / 1e9
    fcfs, rr = runs[0], runs[batch]
    assert rr.read_bytes_pe == fcfs.read_bytes_pe == 2 * 127 * 64 * KVB
    assert rr.storage_busy_pe * rr.jct_s == pytest.approx(fcfs.storage_busy_pe * fcfs.jct_s)
    # the first turn waits for the other's first batch too; the second ends as it did
    assert rr.ttft_mean == pytest.approx(fcfs.ttft_mean + one_batch / 2, rel=0.02)
    assert rr.ttft_p99 == pytest.approx(fcfs.ttft_p99, rel=0.02)
    assert rr.jct_s == pytest.approx(fcfs.jct_s, rel=0.02)
    with pytest.raises(ValueError, match="read_batch_bytes"):
        SimCluster(1, 1, read_batch_bytes=-1)


def test_batch_turns_serve_every_turn_on_both_sides():
    """Taking turns a batch each, decode-side and split reads also read every stored byte once
    and serve every turn (a decode batch crosses to the prefill as it lands)."""
    t = trajs(16)
    for side in ("de", "split", "shorter"):
        a, b = (simulate(SimCluster(1, 1, gpus_per_node=1, read_side=side, read_batch_bytes=rb),
                         FAST, t) for rb in (0, 1 << 28))
        assert a.turns == b.turns
        assert a.read_bytes_pe + a.read_bytes_de == b.read_bytes_pe + b.read_bytes_de > 0
