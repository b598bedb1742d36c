"""Agentic traces: generated trajectories shaped like the paper's Table 2, Mooncake traces, JSONL.

A trajectory is one agent's session: an initial context, then turns of (append, generate)
tokens. Turn t's prompt is everything so far (initial + all earlier appends and generations) plus
its own append; the server generates exactly `generate` tokens (ignore_eos).

Generator (seeded; every draw documented here so results can be reproduced and compared):
- turns per trajectory ~ 1 + Geometric(p = 1 / mean_turns), capped by `max_len`: a trajectory
  ends before the turn whose prompt + generation would exceed `max_len` tokens;
- append and generation lengths per turn ~ LogNormal with the preset means and sigma 0.6
  (heavy-tailed like tool outputs), at least 1 token;
- initial context ~ LogNormal(mean `initial_mean`, sigma 0.3).
Table 2's means (mean turns 60/106/157 with 608/474/429-token appends for MaxLen 32K/48K/64K)
imply more tokens than MaxLen allows, so the cap binds; `describe()` reports what a trace
achieved, and results must state it next to the preset.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TraceShape:
    max_len: int
    mean_turns: float
    mean_append: float
    mean_generate: float
    initial_mean: float = 2048.0

    def scaled(self, factor: float) -> TraceShape:
        """Every length times `factor` (turn counts unchanged), to fit a smaller host."""
        return TraceShape(int(self.max_len * factor), self.mean_turns,
                          self.mean_append * factor, self.mean_generate * factor,
                          self.initial_mean * factor)


# The paper's Table 2 (MaxLen, mean turns, mean append, mean generation).
PRESETS = {
    "32k": TraceShape(32 * 1024, 60, 608, 148),
    "48k": TraceShape(48 * 1024, 106, 474, 172),
    "64k": TraceShape(64 * 1024, 157, 429, 176),
}


@dataclass
class Trajectory:
    agent: int
    initial: int
    turns: list[tuple[int, int]] = field(default_factory=list)  # (append, generate)
    arrival_s: float = 0.0

    def prompt_lengths(self) -> list[int]:
        out, ctx = [], self.initial
        for append, gen in self.turns:
            out.append(ctx + append)
            ctx += append + gen
        return out

    def to_json(self) -> str:
        return json.dumps({"agent": self.agent, "initial": self.initial, "turns": self.turns,
                           "arrival_s": self.arrival_s})

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        d = json.loads(line)
        return cls(int(d["agent"]), int(d["initial"]), [(int(a), int(g)) for a, g in d["turns"]],
                   float(d.get("arrival_s", 0.0)))


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    mu = math.log(mean) - sigma * sigma / 2  # so that E[X] = mean
    return max(1, round(rng.lognormvariate(mu, sigma)))


def generate(shape: TraceShape, agents: int, seed: int = 0,
             arrival_rate: float | None = None) -> list[Trajectory]:
    """`agents` trajectories; with `arrival_rate` (agents/s) Poisson arrivals, else all at 0."""
    if agents < 1 or shape.max_len < 2:
        raise ValueError("need agents >= 1 and max_len >= 2")
    rng = random.Random(seed)
    p = 1.0 / max(1.0, shape.mean_turns)
    out, t = [], 0.0
    for a in range(agents):
        want = 1 + int(math.log(1 - rng.random()) / math.log(1 - p)) if p < 1 else 1
        initial = min(_lognormal(rng, shape.initial_mean, 0.3), shape.max_len - 1)
        traj, ctx = Trajectory(a, initial), initial
        for _ in range(want):
            append = _lognormal(rng, shape.mean_append, 0.6)
            gen = _lognormal(rng, shape.mean_generate, 0.6)
            if ctx + append + gen > shape.max_len:
                break
            traj.turns.append((append, gen))
            ctx += append + gen
        if arrival_rate:
            t += rng.expovariate(arrival_rate)
            traj.arrival_s = t
        out.append(traj)
    return out


def describe(trajs: list[Trajectory]) -> dict:
    turns = [t for tr in trajs for t in tr.turns]
    prompts = [p for tr in trajs for p in tr.prompt_lengths()]
    n = max(1, len(turns))
    return {"agents": len(trajs), "turns": len(turns),
            "mean_turns": len(turns) / max(1, len(trajs)),
            "mean_append": sum(a for a, _ in turns) / n,
            "mean_generate": sum(g for _, g in turns) / n,
            "mean_prompt": sum(prompts) / max(1, len(prompts)),
            "max_prompt": max(prompts, default=0),
            # the share of each prompt that an earlier turn already computed (cacheable prefix)
            "reuse_ratio": 1 - sum(a for a, _ in turns) / max(1, sum(prompts))}


def write_jsonl(trajs: Iterable[Trajectory], path: Path) -> None:
    with open(path, "w") as f:
        for t in trajs:
            f.write(t.to_json() + "\n")


def read_jsonl(path: Path) -> list[Trajectory]:
    with open(path) as f:
        return [Trajectory.from_json(line) for line in f if line.strip()]


def _records(path: Path, what: str, parse):
    """parse(json object) for each non-blank line; a bad line raises naming path:line."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield parse(json.loads(line))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: not {what} ({e})") from None


def chars_per_4(text: str) -> int:
    """Token count estimate without a tokenizer: 1 token per 4 characters, at least 1."""
    return max(1, len(text) // 4)


def read_messages(path: Path, count_tokens=chars_per_4) -> list[Trajectory]:
    """Multi-turn message traces -> trajectories. One JSON object per line: a conversation as
    `{"messages": [...]}` (or a bare list), each message `{"role", "content"}` in the chat
    API's shape (content a string or a list of `{"type": "text", "text"}` parts), optionally
    `"arrival_s"`. The system prompt (if any) is the initial context; each assistant message
    is a turn's generation, and everything since the previous one (user and tool messages) is
    that turn's append. Token counts come from `count_tokens(text)` (default: chars / 4; pass a
    tokenizer's `lambda t: len(tok.encode(t))` for exact counts). A conversation that does not
    end with an assistant message drops its unanswered tail."""
    def parse(obj) -> tuple[int, list, float]:
        msgs = obj["messages"] if isinstance(obj, dict) else obj
        initial, append, turns = 0, 0, []
        for m in msgs:
            content = m.get("content") or ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            k = count_tokens(content)
            if m["role"] == "system" and not turns and not append:
                initial += k
            elif m["role"] == "assistant":
                if append == 0 and not turns:
                    raise ValueError("an assistant message before any user message")
                turns.append((max(1, append), k))
                append = 0
            else:
                append += k
        arrival = float(obj.get("arrival_s", 0.0)) if isinstance(obj, dict) else 0.0
        return max(1, initial), turns, arrival

    out = []
    for initial, turns, arrival in _records(path, "a message trace line", parse):
        if turns:
            out.append(Trajectory(len(out), initial, turns, arrival))
    return out


@dataclass(frozen=True)
class MooncakeRequest:
    """One line of the Mooncake FAST'25 trace: prefix blocks are shared by hash id."""

    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def read_mooncake(path: Path) -> Iterator[MooncakeRequest]:
    return _records(path, "a Mooncake trace record", lambda d: MooncakeRequest(
        int(d["timestamp"]), int(d["input_length"]), int(d["output_length"]),
        tuple(d["hash_ids"])))


def mooncake_token_ids(req: MooncakeRequest, block_tokens: int = 512) -> list[int]:
    """Token ids whose blocks repeat exactly where the trace's hash ids repeat (prefix sharing),
    truncated to input_length."""
    ids: list[int] = []
    for h in req.hash_ids:
        rng = random.Random(h)
        ids.extend(rng.randrange(1000, 100_000) for _ in range(block_tokens))
        if len(ids) >= req.input_length:
            break
    while len(ids) < req.input_length:  # a trace line may count more tokens than its blocks
        ids.append(1000 + len(ids) % 1000)
    return ids[: req.input_length]

