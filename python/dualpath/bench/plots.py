"""`python -m dualpath.bench.plots RESULT.json [--out DIR]`: PNG plots of a 1P1D comparison.

- jct.png: offline JCT per configuration (bars);
- storage.png: each node's storage read GB/s over time, per configuration (offline run);
- gpu_util.png: prefill and decode GPU utilisation over time, per configuration;
- online.png (with an online sweep): turns/s and TTFT p90 vs agent arrival rate;
- sweep.png (with a storage-cap sweep): offline JCT per config and DualPath's speed-up vs the
  storage-NIC cap (where the gain shrinks as the workload turns compute-bound).
Runs where the result is (the CPU machine is fine): needs matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dualpath.bench.compare_report import load_result
from dualpath.bench.samplers import rates


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    cfgs = result["configs"]
    tr = result.get("trace", {})
    caption = (f"{result.get('gpu_name')}, {result.get('date')}, {result.get('git_sha')}, "
               f"cap {result.get('snic_gbps')} GB/s/node, trace {tr.get('preset')} "
               f"x{tr.get('scale')}")
    written = []

    if any((c.get("offline") or {}).get("jct_s") for c in cfgs):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        names = [c["config"] for c in cfgs]
        ax.bar(names, [(c.get("offline") or {}).get("jct_s") or 0 for c in cfgs],
               color="tab:blue")
        ax.set_ylabel("offline JCT (s)")
        ax.set_title(caption, fontsize=7)
        written.append(_save(fig, out / "jct.png"))

    sampled = [c for c in cfgs if (c.get("offline") or {}).get("samples")]  # --no-offline: none
    for key, fname, ylabel in (("agents", "storage.png", "storage read (GB/s)"),
                               ("gpu", "gpu_util.png", "GPU utilisation (%)")):
        if not sampled:
            break
        fig, axes = plt.subplots(len(sampled), 1, figsize=(6, 2.2 * len(sampled)),
                                 squeeze=False)
        for ax, c in zip(axes[:, 0], sampled, strict=True):
            rows = [(t, r) for t, r in c["offline"]["samples"][key]]
            if key == "agents":
                for node in ("pe", "de"):
                    pts = rates(rows, f"{node}_read_bytes")
                    ax.plot([t for t, _ in pts], [v for _, v in pts], label=f"{node} node")
                ax.axhline(result.get("snic_gbps") or 0, color="grey", ls=":", lw=1)
            else:
                for label, pts in util_series(c["offline"]).items():
                    ax.plot([t for t, _ in pts], [v for _, v in pts], label=label)
            ax.set_title(c["config"], fontsize=8)
            ax.set_ylabel(ylabel, fontsize=7)
            ax.legend(fontsize=7)
        axes[-1, 0].set_xlabel("time (s)")
        fig.suptitle(caption, fontsize=7)
        written.append(_save(fig, out / fname))

    if any(c.get("online") for c in cfgs):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for c in cfgs:
            runs = c.get("online") or []
            a1.plot([r["aps"] for r in runs], [r.get("turns_per_s") or 0 for r in runs], "o-",
                    label=c["config"])
            a2.plot([r["aps"] for r in runs], [r.get("ttft_s_p90") or 0 for r in runs], "o-",
                    label=c["config"])
        a1.set_xlabel("agents per second")
        a1.set_ylabel("turns/s")
        a2.set_xlabel("agents per second")
        a2.set_ylabel("TTFT p90 (s)")
        a2.axhline(result.get("slo", {}).get("ttft_s", 4.0), color="grey", ls=":", lw=1)
        a1.legend(fontsize=7)
        fig.suptitle(caption, fontsize=7)
        written.append(_save(fig, out / "online.png"))

    if any(c.get("sweep") for c in cfgs):
        def points(c):
            runs = [{"snic_gbps": result.get("snic_gbps"), **c["offline"]}, *c.get("sweep", [])]
            return sorted((r["snic_gbps"], r.get("jct_s")) for r in runs if r.get("jct_s"))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        base = dict(points(next((c for c in cfgs if c["config"] == "off"), cfgs[0])))
        for c in cfgs:
            pts = points(c)
            a1.plot([x for x, _ in pts], [j for _, j in pts], "o-", label=c["config"])
            if c["config"] != "off" and base:
                sp = [(x, base[x] / j) for x, j in pts if x in base]
                a2.plot([x for x, _ in sp], [v for _, v in sp], "o-", label=c["config"])
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_xlabel("storage-NIC cap per node (GB/s)")
            a.legend(fontsize=7)
        a1.set_ylabel("offline JCT (s)")
        a2.set_ylabel("JCT speed-up over off")
        a2.axhline(1.0, color="grey", ls=":", lw=1)
        fig.suptitle(caption.replace(f"cap {result.get('snic_gbps')} GB/s/node, ", ""),
                     fontsize=7)
        written.append(_save(fig, out / "sweep.png"))
    return written


def util_series(run: dict) -> dict[str, list[tuple[float, float]]]:
    """(time, GPU %) of the run's own prefill and decode GPUs: `run["gpus"]` (with
    --parallel-start, config k has GPUs 2k and 2k+1); 0 and 1 for results without it."""
    pe_gpu, de_gpu = run.get("gpus") or (0, 1)
    rows = run["samples"]["gpu"]
    return {label: [(t, r[f"gpu{g}_util"]) for t, r in rows if f"gpu{g}_util" in r]
            for label, g in (("prefill", pe_gpu), ("decode", de_gpu))}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", type=Path)
    ap.add_argument("--out", type=Path, help="default: next to the result")
    args = ap.parse_args(argv)
    result = load_result(args.result)
    for p in plot(result, args.out or args.result.parent):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
