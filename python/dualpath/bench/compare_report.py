"""The side-by-side tables of a 1P1D comparison (compare_1p1d's result), and the per-run
figures they show that the run itself does not compute."""

from __future__ import annotations

import json
import lzma
from pathlib import Path


def load_result(path: str | Path) -> dict:
    """A result JSON as committed: plain, or xz-compressed (``.json.xz``, for the large runs
    whose per-request records would otherwise fill the GPU host's 64 MiB tree allowance)."""
    path = Path(path)
    if path.suffix == ".xz":
        with lzma.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


def outputs_match(a: dict, b: dict) -> bool | None:
    """Same greedy outputs turn by turn (digests of the output ids)?"""
    if "turn_records" not in a or "turn_records" not in b:  # a run without it (--no-offline)
        return None
    da = {(r["agent"], r["turn"]): r.get("output_digest") for r in a["turn_records"]}
    db = {(r["agent"], r["turn"]): r.get("output_digest") for r in b["turn_records"]}
    common = set(da) & set(db)
    return None if not common else all(da[k] == db[k] for k in common)


def _stage(run: dict, role: str, field: str, stat: str = "p50"):
    return (((run.get("stages") or {}).get(role) or {}).get(field) or {}).get(stat)


def recomputed_share(run: dict) -> float | None:
    """Share of the later turns' prompt tokens the prefill computed (first turns have nothing
    stored): what a stored prefix that was not reused costs."""
    pre = [s for s in run.get("stage_records") or () if s.get("type") == "prefill"]
    turns = run.get("turn_records") or ()
    later = sum(t["prompt_len"] for t in turns if t.get("turn", 0) > 0)
    if not pre or not later:
        return None
    computed = sum(s["input_len"] - (s.get("cached_input_len") or 0) for s in pre)
    first = sum(t["prompt_len"] for t in turns if t.get("turn", 0) == 0)
    return round(max(0, computed - first) / later, 3)


def arrival_match_share(run: dict) -> float | None:
    """Share of the prompt tokens the prefill's arrival matches found in its own GPU and host
    pools (before any storage read)."""
    b = run.get("bytes") or {}
    m, n = b.get("pe_pf_arrival_matched_tokens"), b.get("pe_pf_arrival_new_tokens")
    if m is None or n is None or m + n == 0:
        return None
    return round(m / (m + n), 3)


def read_rate_per_prefetch(run: dict) -> float | None:
    """Thousands of tokens per second one storage prefetch of the prefill loaded, on average:
    tokens loaded over seconds from start to completion (many in flight share the NIC; an
    8B-shaped token is 128 KiB, so 48 k tokens/s is a 6.25 GB/s link)."""
    b = run.get("bytes") or {}
    s, n = b.get("pe_pf_read_s_total"), b.get("pe_pf_read_tokens_total")
    if not s or not n:
        return None
    return round(n / s / 1e3, 1)


def prefetch_stage_mean(run: dict, stage: str) -> float | None:
    """Mean seconds per prefetched request on the prefill for one stage ('to_start': arrival
    to the read's start, 'read_all': start to completion, 'to_run': completion to the
    request's batch); None without the meters."""
    b = run.get("bytes") or {}
    count = {"to_start": "to_start_count", "read_all": "done_count", "to_run": "ran_count"}
    s, n = b.get(f"pe_pf_{stage}_s_total"), b.get(f"pe_pf_{count[stage]}")
    if s is None or not n:
        return None
    return round(s / n, 3)


def prefill_sum(run: dict, field: str) -> int:
    """Sum of one field of a run's prefill request records (e.g. input_len, cached_input_len)."""
    return sum(int(s.get(field) or 0) for s in run.get("stage_records") or ()
               if s.get("type") == "prefill")


def loaded_share(run: dict, of: str = "input_len") -> float | None:
    """Tokens the prefill's storage prefetches read (either read side) over the sum of a
    field of its records: of the prompt tokens (`input_len`) or of those it reused
    (`cached_input_len`); None without the counter or the records. Read = loaded (new to the
    tree) + refetched (`--refetch-host-hits`: host hits read again, which the tree then drops
    as duplicates, so `pe_pf_loaded_tokens` alone misses them)."""
    b = run.get("bytes") or {}
    loaded = b.get("pe_pf_loaded_tokens")
    total = prefill_sum(run, of)
    if loaded is None or not total:
        return None
    return (loaded + (b.get("pe_pf_refetched_tokens") or 0)) / total


def storage_share(run: dict) -> float | None:
    """Share of the prompt tokens the prefill's storage prefetches loaded (either read side)."""
    share = loaded_share(run)
    return None if share is None else round(share, 3)


def table(results: list[dict]) -> str:
    rows = [("JCT s", "jct_s"), ("turns/s", "turns_per_s"), ("TTFT p50 s", "ttft_s_p50"),
            ("TTFT p90 s", "ttft_s_p90"), ("TPOT p50 s", "tpot_s_p50"),
            ("PE read GB/s", "pe_read_gbps_mean"), ("DE read GB/s", "de_read_gbps_mean"),
            ("errors", "errors")]
    stages = [("PE hit tok mean", "prefill", "cached_input_len", "mean"),  # not recomputed
              ("PE queue p50 s", "prefill", "queue_s"),  # includes the storage prefetch wait
              ("PE fwd+xfer p50", "prefill", "forward_s"),
              ("KV GiB/s p50", "prefill", "transfer_speed_gbps"),  # SGLang reports GiB/s
              ("DE xfer p50 s", "decode", "transfer_s"), ("DE fwd p50 s", "decode", "forward_s")]
    head = f"{'':16}" + "".join(f"{r['config']:>12}" for r in results)
    lines = [head]

    def cell(v) -> str:
        return f"{v:>12.3f}" if isinstance(v, float) else f"{v!s:>12}"
    for label, key in rows:
        lines.append(f"{label:16}" + "".join(cell(r["offline"].get(key)) for r in results))
    # storage NICs busy over the replay's read window (issue 8: >= 90% of the caps)
    for label, key in (("PE NIC busy", "pe_util"), ("DE NIC busy", "de_util"),
                       ("reads from s", "from_s"), ("reads to s", "to_s")):
        lines.append(f"{label:16}" + "".join(
            cell((r["offline"].get("storage_util") or {}).get(key)) for r in results))
    for label, role, field, *stat in stages:
        lines.append(f"{label:16}" + "".join(cell(_stage(r["offline"], role, field, *stat))
                                             for r in results))
    for label, key in (("PE pf calls", "pe_pf_calls"), ("PE pf started", "pe_pf_started"),
                       ("PE pf queued", "pe_pf_queued"),
                       ("PE pf no budget", "pe_pf_refused_budget"),
                       ("PE pf too short", "pe_pf_refused_short"),
                       ("PE held on match", "pe_pf_held_matched"),
                       ("PE hold no room", "pe_pf_hold_skipped_room"),
                       ("PE WT no host", "pe_pf_write_through_failed"),
                       ("PE pf no host", "pe_pf_waited_host"), ("PE pf revoked", "pe_pf_empty"),
                       ("PE no GPU room", "pe_pf_loadback_failed"), ("PE pf held", "pe_pf_held"),
                       ("PE hold expired", "pe_pf_hold_expired"),
                       ("PE match pinned", "pe_pf_arrival_pinned"),
                       ("PE match writing", "pe_pf_arrival_backup_pending"),
                       ("PE GPU trimmed", "pe_pf_device_trimmed_tokens"),
                       ("PE refetched", "pe_pf_refetched_tokens"),
                       ("PE pf wait write", "pe_pf_waited_write")):
        lines.append(f"{label:16}" + "".join(cell((r["offline"].get("bytes") or {}).get(key))
                                             for r in results))
    lines.append(f"{'PE recomputed':16}" + "".join(cell(recomputed_share(r["offline"]))
                                                  for r in results))
    for label, fn in (("PE arrival match", arrival_match_share),
                      ("PE from storage", storage_share),
                      ("PE pf ktok/s", read_rate_per_prefetch),
                      ("PE pf wait s", lambda r: prefetch_stage_mean(r, "to_start")),
                      ("PE pf read s", lambda r: prefetch_stage_mean(r, "read_all")),
                      ("PE pf->run s", lambda r: prefetch_stage_mean(r, "to_run"))):
        lines.append(f"{label:16}" + "".join(cell(fn(r["offline"])) for r in results))
    for label, key in (("to prefill s", "to_prefill_s"), ("after prefill s", "after_prefill_s")):
        lines.append(f"{label:16}" + "".join(
            cell((r["offline"].get("turn_breakdown") or {}).get(key)) for r in results))
    lines.append(f"{'router wait s':16}" + "".join(
        cell(r["offline"].get("router_admission_wait_s_mean")) for r in results))
    for label, key in (("PE in queue", "mean_in_queue"), ("PE in forward", "mean_in_forward"),
                       ("PE no forward", "no_forward_share"),
                       ("PE reqs/batch", "requests_per_batch")):
        lines.append(f"{label:16}" + "".join(
            cell((r["offline"].get("prefill_timeline") or {}).get(key)) for r in results))
    lines.append(f"{'PE GPU evicted':16}" + "".join(
        cell((r["offline"].get("bytes") or {}).get("pe_pf_gpu_evicted_tokens"))
        for r in results))
    if any(r.get("online") for r in results):
        lines.append(f"{'max APS in SLO':16}" + "".join(cell(r.get("max_aps_within_slo"))
                                                       for r in results))
    base = next((r for r in results if r["config"] == "off"), None)
    if base and base["offline"].get("jct_s"):
        lines.append(f"{'JCT speed-up':16}" + "".join(
            f"{base['offline']['jct_s'] / r['offline']['jct_s']:>12.2f}"
            if r["offline"].get("jct_s") else f"{'-':>12}" for r in results))
    return "\n".join(lines)


def online_table(results: list[dict]) -> str:
    """One row per online run: rate, agents, turns done, TTFT / TPOT means (the SLO's
    measures: <= 4 s and <= 50 ms), when the stop rule ended it, within the SLO; then each
    config's max APS within the SLO and its ratio to the baseline's."""
    lines = [f"{'config':>8}{'APS':>8}{'agents':>8}{'turns':>8}{'TTFT mean':>11}"
             f"{'TTFT p90':>10}{'TPOT mean':>11}{'stopped s':>11}{'in SLO':>8}"]
    for r in results:
        for o in r.get("online") or []:
            def num(k, f="{:.3f}", o=o):
                v = o.get(k)
                return "-" if v is None else f.format(v)
            lines.append(f"{r['config']:>8}{o['aps']:>8.3f}{o.get('agents', '-')!s:>8}"
                         f"{num('turns_ok', '{}'):>8}{num('ttft_s_mean'):>11}"
                         f"{num('ttft_s_p90'):>10}{num('tpot_s_mean', '{:.4f}'):>11}"
                         f"{num('stopped_at_s', '{:.1f}'):>11}"
                         f"{'yes' if o.get('within_slo') else 'no':>8}")
    base = next((r for r in results if r["config"] == "off"), {}).get("max_aps_within_slo")
    for r in results:
        m = r.get("max_aps_within_slo")
        ratio = f" ({m / base:.2f}x off)" if m and base else ""
        lines.append(f"{r['config']}: max APS within the SLO {m}{ratio} (of the rates run)")
    return "\n".join(lines)


def sweep_table(results: list[dict], main_cap: float) -> str:
    """Offline JCT per storage-NIC cap and config, and each config's speed-up over `off`."""
    by: dict[float, dict[str, dict]] = {}
    for r in results:
        for run in [{"snic_gbps": main_cap, **r["offline"]}, *r["sweep"]]:
            by.setdefault(run["snic_gbps"], {})[r["config"]] = run
    names = [r["config"] for r in results]
    lines = [f"{'cap GB/s':>9}" + "".join(f"{'JCT ' + n:>13}" for n in names)
             + "".join(f"{'x ' + n:>9}" for n in names if n != "off")
             + "".join(f"{'util ' + n:>11}" for n in names)]
    for cap in sorted(by):
        row = by[cap]
        base = (row.get("off") or {}).get("jct_s")
        js = [row.get(n, {}).get("jct_s") for n in names]
        line = f"{cap:>9.2f}" + "".join(f"{j:>13.2f}" if isinstance(j, (int, float))
                                        else f"{'-':>13}" for j in js)
        for n in names:
            if n != "off":
                j = row.get(n, {}).get("jct_s")
                line += f"{base / j:>9.2f}" if base and j else f"{'-':>9}"
        line += "".join(f"{row.get(n, {}).get('storage_util', {}).get('cluster_util', '-')!s:>11}"
                        for n in names)
        lines.append(line)
    return "\n".join(lines)


_SAME = ("git_sha", "model", "snic_gbps", "trace", "device_pool_tokens", "host_pool_tokens",
         "decode_pool_tokens", "mem_fraction", "pd_backend", "host_cache_tokens",
         "device_cache_tokens", "refetch_host_hits", "prefetch_io_threads")


def merge(results: list[dict]) -> dict:
    """One comparison from runs of the same trace and setup made in separate calls (e.g. the
    baseline in one device call, DualPath in the next, on the same machine): their configs
    side by side, outputs compared with the baseline's. Raises if the runs differ in anything
    that would make the comparison unfair."""
    if not results:
        raise ValueError("nothing to merge")
    first = results[0]
    for other in results[1:]:
        diff = [k for k in _SAME if other.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"runs differ in {diff}: not one comparison")
    merged = {**first, "configs": [c for r in results for c in r["configs"]],
              "merged_from": [{k: r.get(k) for k in ("date", "gpus", "setup_s")}
                              for r in results]}
    names = [c["config"] for c in merged["configs"]]
    if len(set(names)) != len(names):
        raise ValueError(f"a config appears twice: {names}")
    base = next((c for c in merged["configs"] if c["config"] == "off"), None)
    for c in merged["configs"]:  # a config whose run failed early has no offline run
        if base is not None and c is not base and not c.get("oracle"):
            c["outputs_match_off"] = outputs_match(base.get("offline") or {},
                                                   c.get("offline") or {})
    merged["ok"] = all(r.get("ok") for r in results)
    failures = [r["failure"] for r in results if r.get("failure")]
    if failures:
        merged["failure"] = "; ".join(failures)
    merged["warnings"] = [w for r in results for w in r.get("warnings") or []]
    return merged


# what fixes the trajectories (max_turns only truncates them)
_TRAJECTORIES = ("preset", "scale", "initial", "seed", "agents")


def same_outputs(a: dict, b: dict) -> dict[str, bool | None]:
    """Per config name found in both results: the same greedy outputs turn by turn? For checking
    that a change meant for speed (another commit, a scheduling or I/O knob) left every token
    as it was: the same model and trajectories (a run with fewer turns per agent compares its
    turns with the other's first ones); nothing else needs to be the same."""
    ta, tb = a.get("trace") or {}, b.get("trace") or {}
    if (a.get("model") != b.get("model")
            or any(ta.get(k) != tb.get(k) for k in _TRAJECTORIES)):
        raise ValueError("different traces or models: outputs are not comparable")
    ca = {c["config"]: c for c in a["configs"] if c.get("offline")}
    cb = {c["config"]: c for c in b["configs"] if c.get("offline")}
    return {n: outputs_match(ca[n]["offline"], cb[n]["offline"]) for n in ca if n in cb}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Print the side-by-side table of compare_1p1d "
                                             "results; several files (same trace and setup, "
                                             "e.g. off and on from two device calls) are "
                                             "merged into one comparison.")
    ap.add_argument("results", nargs="+", type=Path, help="result.json (or .json.xz) files")
    ap.add_argument("--out", type=Path, help="write the merged result here")
    ap.add_argument("--same-outputs", action="store_true",
                    help="two results of the same trace from different setups or commits: "
                         "say per config whether every turn's output is the same (exit 1 if "
                         "any differs)")
    ap.add_argument("--timeline", metavar="CONFIG",
                    help="print this config's offline replay as a time line instead "
                         "(sample_timeline.py: storage GB/s per node, prefetches, GPU busy)")
    args = ap.parse_args(argv)
    if args.timeline:
        from dualpath.bench.sample_timeline import format_rows, timeline

        runs = [c for p in args.results for c in load_result(p)["configs"]
                if c["config"] == args.timeline]
        if not runs:
            ap.error(f"no config {args.timeline!r} in {[str(p) for p in args.results]}")
        print(format_rows(timeline(runs[0]["offline"])))
        return 0
    if args.same_outputs:
        if len(args.results) != 2:
            ap.error("--same-outputs compares two results")
        try:
            got = same_outputs(*(load_result(p) for p in args.results))
        except (ValueError, KeyError) as e:
            ap.error(str(e))
        for name, ok in got.items():
            print(f"{name}: same outputs: {ok}")
        return 0 if got and all(got.values()) else 1
    try:
        merged = merge([load_result(p) for p in args.results])
    except (ValueError, KeyError) as e:
        ap.error(str(e))
    print(table(merged["configs"]))
    for c in merged["configs"]:
        if "outputs_match_off" in c:
            print(f"{c['config']}: outputs match off: {c['outputs_match_off']}")
    if args.out:
        args.out.write_text(json.dumps(merged) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
