#!/usr/bin/env python3
"""Build the offline bundle that lets SGLang 0.5.17 + DualPath run on an air-gapped GPU host.

Run on any Linux machine with PyPI access (no GPU needed; ~4 min the first time, the 383 MB
sglang-kernel wheel is cached). Copy the output directory to the GPU host next to the checkout
(default: .bundle/) and run scripts/gpu_setup.sh there. What is carried, what is trimmed and
why: docs/gpu-bundle.md and the output's manifest.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))  # usable from a plain checkout, before any install

from dualpath.deploy import make_bundle  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".bundle",
                    help="output directory: manifest.json + archive parts (default: .bundle)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/dualpath/bundle",
                    help="download cache and staging area")
    ap.add_argument("--part-mib", type=int, default=60,
                    help="largest part in MiB (uploads to our GPU host are capped at 60 MiB)")
    ap.add_argument("--no-nixl", action="store_true",
                    help="leave out NIXL (the PD transfer backend used without RDMA), ~8 MiB")
    ap.add_argument("--keep-stage", action="store_true", help="keep the unpacked staging tree")
    args = ap.parse_args()
    if args.part_mib < 1:
        ap.error("--part-mib must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    m = make_bundle.build(args.out, args.cache, nixl=not args.no_nixl, part_mib=args.part_mib,
                          keep_stage=args.keep_stage)
    mib = m["archive"]["bytes"] / (1 << 20)
    print(f"bundle: {args.out} ({mib:.1f} MiB in {len(m['parts'])} part(s), "
          f"{len(m['packages'])} distributions, sglang {m['sglang']})")
    for t in m["trimmed"]:
        print(f"  trimmed {t['dist']}:{t['path']} ({t['bytes'] / (1 << 20):.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
