"""`python -m dualpath`: print the package version, native build and environment settings."""

from __future__ import annotations

import argparse
import json

from dualpath import __version__, build_info, env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dualpath",
        description="Show how dualpath was built and which DUALPATH_* variables are in force.",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    report = {
        "version": __version__,
        "build": build_info(),
        "env": {v.name: v.get() for v in env.ALL},
    }
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    print(f"dualpath {__version__}")
    for k, v in report["build"].items():
        print(f"  build.{k}: {v}")
    for v in env.ALL:
        print(f"  {v.name}={v.get()!r}{'' if v.is_set() else ' (default)'}  # {v.help}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
