"""`python -m dualpath.router`: the DualPath global scheduler as an HTTP router for SGLang PD.

Example (one prefill server with bootstrap port 8998, one decode server):
  python -m dualpath.router --prefill http://127.0.0.1:30010 8998 \\
      --decode http://127.0.0.1:30020 --port 8000
Engines can also come from --engines-file (a JSON list of {role, url, bootstrap_port, node,
group, kv_capacity}) and be added or removed at runtime through /engines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from aiohttp import web

from dualpath import env
from dualpath.config import RouterConfig, SchedulerConfig
from dualpath.router.app import make_app
from dualpath.router.core import Router
from dualpath.router.engines import Engine


def parse_args(argv=None) -> tuple[RouterConfig, SchedulerConfig, list[Engine]]:
    rc, sc = RouterConfig, SchedulerConfig
    ap = argparse.ArgumentParser(prog="python -m dualpath.router",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--prefill", nargs=2, action="append", default=[],
                    metavar=("URL", "BOOTSTRAP_PORT"), help="a prefill server (repeatable)")
    ap.add_argument("--decode", action="append", default=[], metavar="URL",
                    help="a decode server (repeatable)")
    ap.add_argument("--engines-file", help="JSON list of engines (role, url, bootstrap_port, "
                                           "node, group, kv_capacity)")
    ap.add_argument("--host", default=rc.host)
    ap.add_argument("--port", type=int, default=rc.port)
    ap.add_argument("--policy", choices=["dualpath", "round_robin", "random"], default=rc.policy,
                    help="dualpath: the paper's scheduler; round_robin/random: its Basic pairs")
    ap.add_argument("--read-side", choices=["shorter", "split", "pe", "de"], default=sc.read_side,
                    help="which node reads a stored prefix (dualpath policy)")
    ap.add_argument("--hit-estimate", choices=["prompt", "none"], default=rc.hit_estimate,
                    help="stored-prefix tokens assumed per request (the router does not see "
                         "the store): prompt = whole blocks of the prompt, none = 0")
    ap.add_argument("--max-queue", type=int, default=rc.max_queue,
                    help="waiting requests before 503")
    ap.add_argument("--queue-timeout-s", type=float, default=rc.queue_timeout_s)
    ap.add_argument("--max-attempts", type=int, default=rc.max_attempts,
                    help="engine pairs tried when an engine is unreachable")
    ap.add_argument("--stats-interval-s", type=float, default=rc.stats_interval_s)
    ap.add_argument("--max-body-bytes", type=int, default=rc.max_body_bytes)
    ap.add_argument("--max-prompt-tokens", type=int, default=rc.max_prompt_tokens)
    ap.add_argument("--warm-pairs", action=argparse.BooleanOptionalAction, default=rc.warm_pairs,
                    help="send one 1-token request through each new prefill/decode pair before "
                         "/health reports ready: a pair's first request pays the PD transfer "
                         "backend's set-up (SGLang's NIXL: ~10 s for a 300K-token decode pool)")
    ap.add_argument("--warm-timeout-s", type=float, default=rc.warm_timeout_s,
                    help="give a pair's warm-up up after this long (with a warning)")
    args = ap.parse_args(argv)
    cfg = RouterConfig(host=args.host, port=args.port, policy=args.policy,
                       max_queue=args.max_queue, queue_timeout_s=args.queue_timeout_s,
                       max_attempts=args.max_attempts, stats_interval_s=args.stats_interval_s,
                       max_body_bytes=args.max_body_bytes,
                       max_prompt_tokens=args.max_prompt_tokens,
                       hit_estimate=args.hit_estimate, warm_pairs=args.warm_pairs,
                       warm_timeout_s=args.warm_timeout_s)
    engines = [Engine.from_dict({"role": "prefill", "url": u, "bootstrap_port": int(p)})
               for u, p in args.prefill]
    engines += [Engine.from_dict({"role": "decode", "url": u}) for u in args.decode]
    if args.engines_file:
        with open(args.engines_file) as f:
            engines += [Engine.from_dict(d) for d in json.load(f)]
    if not engines:
        ap.error("no engines: give --prefill/--decode or --engines-file")
    return cfg, SchedulerConfig(read_side=args.read_side), engines


def main(argv=None) -> None:
    cfg, sched_cfg, engines = parse_args(argv)
    logging.basicConfig(level=env.LOG_LEVEL.get().upper(),
                        format="[%(asctime)s %(name)s] %(message)s")
    log = logging.getLogger("dualpath.router")
    log.info("router config: %s", dataclasses.asdict(cfg))
    log.info("scheduler config: %s", dataclasses.asdict(sched_cfg))
    for e in engines:
        log.info("engine: %s", e.to_dict())
    web.run_app(make_app(Router(cfg, engines, sched_cfg)), host=cfg.host, port=cfg.port,
                print=None)


if __name__ == "__main__":
    main()
