"""`compare_1p1d --concurrent`: every config at the same time, each in a process of its own.

Config k runs `python -m dualpath.bench.compare_1p1d` with the same options on GPU pair
SLOT + k (`--slot`, its own ports and store directory) and writes OUT/<config>/result.json;
once all have ended their results are merged (`compare_report.merge`) into OUT/result.json,
marked `"concurrent": true`, and the tables printed. One call then costs one server start-up
and the longest config's runs instead of the sum: what makes an online comparison (minutes of
arrivals per rate) fit one device call.

What is shared while they run: the host's CPUs, memory bandwidth and /dev/shm (each config's
store and emulated storage NICs are its own), and nothing on the GPUs. Each config's replay
client is its own process, so one arm's client never waits on the other's GIL. A comparison
that must rule out the sharing runs the configs one after another (`--parallel-start`).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("dualpath.compare_1p1d")

# options of the parent that the children must not get (or get their own value of)
_OWN = {"--concurrent": 0, "--configs": 1, "--out": 1, "--slot": 1, "--setup-s": 1}


def child_argv(argv: list[str], name: str, slot: int, out: Path) -> list[str]:
    """The parent's options with --concurrent dropped and this child's config, slot and
    output directory (both `--opt value` and `--opt=value` spellings); --online-aps keeps the
    rates of every config and this config's own (a child refuses other configs' rates)."""
    kept, skip, aps_next = [], 0, False
    for a in argv:
        if skip:
            skip -= 1
            continue
        if aps_next:
            kept.append(_own_rates(a, name))
            aps_next = False
            continue
        key = a.split("=", 1)[0]
        if key in _OWN:
            skip = _OWN[key] if "=" not in a else 0
            continue
        if key == "--online-aps":
            if "=" in a:
                kept.append("--online-aps=" + _own_rates(a.split("=", 1)[1], name))
            else:
                kept.append(a)
                aps_next = True
            continue
        kept.append(a)
    return kept + ["--configs", name, "--slot", str(slot), "--out", str(out)]


def _own_rates(spec: str, name: str) -> str:
    return ",".join(t for t in spec.split(",") if "=" not in t or t.split("=")[0] == name)


def run(argv: list[str], args) -> int:
    """Start one child per config, wait for all, merge their results into OUT/result.json."""
    from dualpath.bench.compare_report import merge, online_table, sweep_table, table
    from dualpath.bench.run_evidence import archive_logs
    from dualpath.bench.smoke import gpu_facts

    logging.basicConfig(level=logging.INFO, format="[1p1d %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    names = args.configs.split(",")
    gpus = gpu_facts()["gpus"]
    need = 2 * (args.slot + len(names))
    if len(gpus) < need:
        log.error("FAIL --concurrent: %d configs from slot %d need %d GPUs, this host has %d",
                  len(names), args.slot, need, len(gpus))
        return 1
    from dualpath.bench.compare_1p1d import make_trace, store_written_gb
    from dualpath.bench.run_evidence import store_room_warning

    room = store_room_warning(args.store_dir, len(names), args.store_capacity_gb,
                              store_written_gb(args, make_trace(args, seed=args.seed)))
    if room:
        log.warning("%s", room)
    procs = []
    for k, name in enumerate(names):
        (args.out / name / "result.json").unlink(missing_ok=True)  # no stale result merged
        cmd = [sys.executable, "-m", "dualpath.bench.compare_1p1d",
               *child_argv(argv, name, args.slot + k, args.out / name)]
        if args.setup_s is not None:
            cmd += ["--setup-s", str(args.setup_s)]
        log.info("%s on GPUs %d,%d: %s", name, 2 * (args.slot + k), 2 * (args.slot + k) + 1,
                 " ".join(cmd[3:]))
        procs.append(subprocess.Popen(cmd))

    def forward(signum, _frame):  # the watchdog's SIGTERM: every child saves and stops
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    results, missing = [], []
    for name in names:
        f = args.out / name / "result.json"
        try:
            results.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            missing.append(name)
    merged = None
    if results:
        try:
            merged = merge(results)
        except (ValueError, KeyError) as e:
            log.error("FAIL could not merge the configs' results: %s: %s", type(e).__name__, e)
    if merged is not None:
        merged["concurrent"] = True
        merged["child_exit_codes"] = dict(zip(names, codes, strict=True))
        if missing:
            merged["failure"] = "; ".join(filter(None, [merged.get("failure"),
                                                        f"no result from {missing}"]))
            merged["ok"] = False
        if room:
            merged["warnings"] = [room, *merged.get("warnings", [])]
        (args.out / "result.json").write_text(json.dumps(merged) + "\n")
        cfgs = merged["configs"]
        if all(c.get("offline") for c in cfgs):
            print(table(cfgs), flush=True)
            if args.snic_sweep:
                print(sweep_table(cfgs, args.snic_gbps), flush=True)
        if any(c.get("online") for c in cfgs):
            print(online_table(cfgs), flush=True)
    archive_logs(args.out)
    ok = merged is not None and merged.get("ok") and not missing and not any(codes)
    log.info("concurrent configs %s ended with %s%s", names, codes,
             f"; no result from {missing}" if missing else "")
    return 0 if ok else 1
