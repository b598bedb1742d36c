"""Evidence a 1P1D comparison keeps besides its timings (compare_1p1d): storage-NIC
utilisation, the prefill's timeline, the router's admission wait, the servers' stack samples of
the measured replay, GPU profiles, and one archive of every config's logs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

from dualpath.bench import gpu_profile, stacks
from dualpath.bench.prefill_timeline import timeline

log = logging.getLogger("dualpath.compare_1p1d")
STACK_FLUSH_S = 5.5  # the servers' samplers rewrite their files every 5 s


def storage_util(a_rows, cap_gbps: float) -> dict:
    """Storage-NIC utilisation while reading: bytes read between the first and the last sample
    at which any node's read counter moved, over that window x cap, per node and for the
    cluster (both nodes' caps); and where the window lies in the sampled run (`from_s`,
    `to_s`: seconds after the first sample; before it, e.g. first turns with nothing stored,
    after it, the last prefills and decodes)."""
    keys = ("pe_read_bytes", "de_read_bytes")
    total = [(t, sum(r.get(k, 0) for k in keys), r) for t, r in a_rows]
    moved = [i for i in range(1, len(total)) if total[i][1] > total[i - 1][1]]
    if not moved or not cap_gbps:
        return {}
    i0, i1 = moved[0] - 1, moved[-1]
    span = total[i1][0] - total[i0][0]
    per = {k.split("_")[0]: (total[i1][2].get(k, 0) - total[i0][2].get(k, 0)) / span / 1e9
           for k in keys}
    return {"window_s": round(span, 2),
            **{f"{n}_util": round(v / cap_gbps, 3) for n, v in per.items()},
            "cluster_util": round(sum(per.values()) / (2 * cap_gbps), 3),
            "from_s": round(total[i0][0] - total[0][0], 2),
            "to_s": round(total[i1][0] - total[0][0], 2)}


def prefill_timeline_or_none(stages) -> dict | None:
    """dualpath.bench.prefill_timeline of the run's prefill records (None without entry
    times)."""
    try:
        return timeline(stages)
    except ValueError:
        return None


def router_admission(url: str) -> tuple[float, float] | None:
    """(seconds summed, requests) the router's admission held requests so far (its
    `dualpath_router_admission_wait_seconds`), or None when it does not say."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    for fam in text_string_to_metric_families(text):
        if fam.name == "dualpath_router_admission_wait_seconds":
            got = {s.name.rsplit("_", 1)[-1]: s.value for s in fam.samples}
            if "sum" in got and "count" in got:
                return got["sum"], got["count"]
    return None


def admission_mean(before, after) -> float | None:
    """Mean seconds a request of the replay waited for the router's admission."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 4)


def stack_files(out: Path, wait_s: float = STACK_FLUSH_S) -> dict:
    """The servers' cumulative stack samples now (after a flush), per role."""
    time.sleep(wait_s)
    got = {}
    for role in ("prefill", "decode"):
        for name, f in ((role, out / f"stacks_{role}.txt"),
                        (f"{role}_threads", out / f"stacks_{role}.txt.threads")):
            got[name] = stacks.read_folded(f) if f.exists() else Counter()
    return got


def stacks_of_replay(out: Path, before: dict, wait_s: float = STACK_FLUSH_S) -> None:
    """OUT/stacks_<role>[_threads]_replay.txt: only the samples of the measured replay (the
    files are cumulative over the server's life: start-up, compiles, warm-up); `_threads`: the
    process's other threads, sampled less often."""
    after = stack_files(out, wait_s)
    for role, now in after.items():
        stacks.write_folded(stacks.window(now, before[role]), out / f"stacks_{role}_replay.txt")
    log.info("stack samples of the replay: %s", {r: sum(stacks.window(a, before[r]).values())
                                                 for r, a in after.items()})


def profile_summaries(out: Path) -> dict:
    res = {}
    for role in ("prefill", "decode"):
        try:
            res[role] = gpu_profile.summarize_dir(out / role)
        except (OSError, ValueError) as e:  # a trace cut short by a stopped server
            res[role] = {"error": f"{type(e).__name__}: {e}"}
        if res[role] and "window_s" in res[role]:
            log.info("%s GPU profile: window %.2f s, kernels running %.0f%%, top %s", role,
                     res[role]["window_s"], 100 * res[role]["kernel_busy_fraction"],
                     [(k["name"][:40], k["s"]) for k in res[role]["kernels"][:4]])
    return res


def archive_logs(out: Path) -> Path | None:
    """OUT/logs.tar.xz: every config's server and router logs and stack files, one file to
    copy off a host that returns few (a stalled or failed run's evidence included)."""
    import tarfile

    files = sorted(p for p in out.rglob("*") if p.is_file()  # --concurrent: OUT/<cfg>/<cfg>/
                   and p.parent != out and p.suffix in (".log", ".txt", ".threads"))
    if not files:
        return None
    dest = out / "logs.tar.xz"
    try:
        with tarfile.open(dest, "w:xz") as tar:
            for p in files:
                tar.add(p, arcname=str(p.relative_to(out)))
    except OSError:
        log.warning("could not write %s", dest, exc_info=True)
        return None
    log.info("logs of every config: %s (%.1f MB)", dest, dest.stat().st_size / 1e6)
    return dest


def gil_snapshots(ports: dict[str, int]) -> dict[str, dict | None]:
    """Each server's GIL monitor snapshot ('gil' of its agent's stats; None where the monitor
    is off or the agent did not answer)."""
    from dualpath.bench.pd_cluster import agent_stats

    out = {}
    for role, port in ports.items():
        try:
            out[role] = agent_stats(port, 5).get("gil")
        except Exception:  # noqa: BLE001  (evidence only: a busy agent must not fail a run)
            out[role] = None
    return out


def gil_delta(before: dict | None, after: dict | None) -> dict | None:
    """What a run added to a GIL monitor's cumulative counts (sglang_plugin/gil_monitor.py):
    ticks, stalls per bucket, stalled seconds, stalls in a GC, GC pauses per generation; the
    largest stall and the stall sites are the server's whole life so far."""
    if not after:
        return None
    b = before or {}
    gc_b = b.get("gc") or {}
    return {"ticks": after["ticks"] - b.get("ticks", 0), "tick_ms": after.get("tick_ms"),
            "stalls_ge_ms": {k: n - (b.get("stalls_ge_ms") or {}).get(k, 0)
                             for k, n in after["stalls_ge_ms"].items()},
            "stalled_s": round(after["stalled_s"] - b.get("stalled_s", 0.0), 4),
            "stalls_in_gc": after["stalls_in_gc"] - b.get("stalls_in_gc", 0),
            "gc_pause_s": {g: round(r["pause_s"] - (gc_b.get(g) or {}).get("pause_s", 0.0), 4)
                           for g, r in after["gc"].items()},
            "max_ms_so_far": after["max_ms"], "sites_so_far": after.get("sites")}


def kv_bytes_per_token(model_dir: Path) -> int:
    """K and V bytes of one token over all layers, from the model's config.json (MHA/GQA;
    bf16/fp16 unless the config says float32); 0 when the config cannot be read."""
    import json

    try:
        c = json.loads((Path(model_dir) / "config.json").read_text())
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        heads = c.get("num_key_value_heads") or c["num_attention_heads"]
        width = 4 if c.get("torch_dtype") == "float32" else 2
        return 2 * c["num_hidden_layers"] * heads * head_dim * width
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 0


def store_room_warning(store_dir: str, stores_at_once: int, cap_gb: float,
                       written_gb: float) -> str | None:
    """Why the stores might not fit the file system under `store_dir` (a tmpfs on the GPU
    host), or None: `stores_at_once` stores (configs run at the same time), each at most
    `cap_gb` GiB (0: no cap; the store's own unit) and writing about `written_gb` GiB."""
    import shutil

    path = Path(store_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    free_gb = shutil.disk_usage(path).free / 2**30
    each = min(cap_gb, written_gb) if cap_gb else written_gb
    need = stores_at_once * each
    if need <= 0.9 * free_gb:
        return None
    return (f"the stores may not fit {path}: {stores_at_once} x {each:.0f} GiB against "
            f"{free_gb:.0f} GiB free (writes past it fail: those pages are not stored and "
            f"later turns recompute them); set --store-capacity-gb below "
            f"{0.9 * free_gb / stores_at_once:.0f}")
