"""The shipped model directories (`configs/models/`) keep their 3 MB tokenizer xz-compressed
(`tokenizer.json.xz`, 0.16 MB): every GPU-host call carries the whole tree, at most 64 MiB with
the offline bundle. `tokenizer.json` is unpacked next to it on first use, by
`python -m dualpath.launch_server`, `scripts/gpu_setup.sh`, `scripts/run_tests.sh`, or by hand:

    python -m dualpath.models            # every directory under configs/models
    python -m dualpath.models DIR [DIR]  # these model directories

A stock `python -m sglang.launch_server --model-path configs/models/...` needs this done first.
`scripts/make_tokenizer.py` rebuilds the same bytes from scratch.
"""

from __future__ import annotations

import argparse
import logging
import lzma
import os
import tempfile
from pathlib import Path

log = logging.getLogger("dualpath.models")

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "configs" / "models"
PACKED = ("tokenizer.json",)


def ensure_unpacked(model_dir: str | os.PathLike) -> list[Path]:
    """Unpack each packed file of `model_dir` whose plain copy is missing or older than its .xz;
    returns the files written. A directory that is not ours (no .xz files) is left alone. The
    write goes to a temporary file renamed into place, so concurrent callers never see a part."""
    d = Path(model_dir)
    written = []
    for name in PACKED:
        plain = d / name
        # tiny-llama-2l links its tokenizer to llama-3.1-8b-dummy's: unpack at the link's target
        if plain.is_symlink():
            plain = plain.resolve()
        packed = plain.with_name(plain.name + ".xz")
        if not packed.is_file():
            continue
        if plain.is_file() and plain.stat().st_mtime >= packed.stat().st_mtime:
            continue
        fd, tmp = tempfile.mkstemp(dir=plain.parent, prefix=f".{plain.name}.")
        try:
            with os.fdopen(fd, "wb") as out, lzma.open(packed) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, plain)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("unpacked %s (%d bytes)", plain, plain.stat().st_size)
        written.append(plain)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualpath.models",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", type=Path,
                    help=f"model directories (default: every one under {MODELS_DIR})")
    args = ap.parse_args(argv)
    if not args.dirs and not MODELS_DIR.is_dir():
        ap.error(f"{MODELS_DIR} not found (an installed copy, not a checkout): name the dirs")
    dirs = args.dirs or sorted(p for p in MODELS_DIR.iterdir() if p.is_dir())
    for d in dirs:
        if not d.is_dir():
            ap.error(f"{d}: not a directory")
        for p in ensure_unpacked(d):
            print(f"unpacked {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
