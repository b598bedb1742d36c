"""`python -m dualpath.bench.agentic`: make an agentic trace, or replay one against a server.

  generate --preset 64k --scale 0.25 --agents 16 [--arrival-rate APS] --out trace.jsonl
  convert --messages conversations.jsonl [--tokenizer DIR] --out trace.jsonl
  replay --url http://127.0.0.1:8000 --trace trace.jsonl [--online] --out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from dualpath.bench.replay import records_jsonl, replay
from dualpath.bench.trace import (
    PRESETS,
    chars_per_4,
    describe,
    generate,
    read_jsonl,
    read_messages,
    write_jsonl,
)
from dualpath.version import git_sha


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualpath.bench.agentic",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a trace (JSONL, one trajectory per line)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="64k",
                   help="the paper's Table 2 shape (MaxLen)")
    g.add_argument("--scale", type=float, default=1.0,
                   help="multiply every length (fit a smaller host); state it with results")
    g.add_argument("--agents", type=int, default=16)
    g.add_argument("--arrival-rate", type=float, help="agents per second (online); default: all "
                                                      "at t=0 (offline)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("convert", help="multi-turn message traces (chat JSONL) -> a trace")
    c.add_argument("--messages", type=Path, required=True,
                   help='one conversation per line: {"messages": [{"role", "content"}, ...]}')
    c.add_argument("--tokenizer", type=Path, help="count tokens with this Hugging Face "
                                                  "tokenizer (default: 4 characters a token)")
    c.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("replay", help="replay a trace against /generate")
    r.add_argument("--url", required=True, help="a server or the router")
    r.add_argument("--trace", type=Path, required=True)
    r.add_argument("--online", action="store_true", help="honour arrival times")
    r.add_argument("--seed", type=int, default=0, help="token-id seed (same seed, same prompts)")
    r.add_argument("--out", type=Path, required=True, help="result JSON (+ .turns.jsonl)")
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        if args.scale <= 0 or args.agents < 1:
            ap.error("--scale must be > 0 and --agents >= 1")
        shape = PRESETS[args.preset].scaled(args.scale)
        trajs = generate(shape, args.agents, args.seed, args.arrival_rate)
        write_jsonl(trajs, args.out)
        print(json.dumps({"preset": args.preset, "scale": args.scale, **describe(trajs)}))
        return 0
    if args.cmd == "convert":
        count = chars_per_4
        if args.tokenizer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
            count = lambda text: max(1, len(tok.encode(text, add_special_tokens=False)))  # noqa: E731
        trajs = read_messages(args.messages, count)
        if not trajs:
            print(f"error: {args.messages}: no conversation with an assistant reply",
                  file=sys.stderr)
            return 2
        write_jsonl(trajs, args.out)
        print(json.dumps(describe(trajs)))
        return 0
    trajs = read_jsonl(args.trace)
    summary, records = asyncio.run(replay(args.url, trajs, online=args.online, seed=args.seed))
    result = {"date": time.strftime("%Y-%m-%d"), "git_sha": git_sha(), "url": args.url,
              "trace": str(args.trace), "trace_shape": describe(trajs), "online": args.online,
              **summary}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".turns.jsonl").write_text(records_jsonl(records))
    print(json.dumps(summary))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
