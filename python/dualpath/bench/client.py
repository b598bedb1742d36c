"""A small streaming client for SGLang's native `/generate` API that measures TTFT and decode rate.

Standard library only (urllib), so it runs wherever the server's Python runs. Token-id requests
(`input_ids`) make prompt lengths exact, with or without a tokenizer on the server.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass
class GenResult:
    output_ids: list[int]
    ttft_s: float
    e2e_s: float
    meta_info: dict = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first over the time after the first (the decode rate one user sees)."""
        n = self.completion_tokens - 1
        dt = self.e2e_s - self.ttft_s
        return n / dt if n > 0 and dt > 0 else None

    @property
    def cached_tokens_details(self) -> dict:
        return self.meta_info.get("cached_tokens_details") or {}


def iter_sse(lines: Iterable[bytes]) -> Iterator[dict]:
    """Yield the JSON objects of a server-sent-event stream, stopping at `data: [DONE]`."""
    for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        obj = json.loads(data)
        if "error" in obj:
            raise RuntimeError(f"server error in stream: {obj['error']}")
        yield obj


def generate(url: str, input_ids: list[int], max_new_tokens: int, *, extra: dict | None = None,
             timeout_s: float = 600.0) -> GenResult:
    """Greedy, `ignore_eos` streaming generation; returns the ids and the timings."""
    body = {"input_ids": input_ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                "ignore_eos": True},
            **(extra or {})}
    req = urllib.request.Request(url.rstrip("/") + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    t_first, last, ids = None, None, []
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for obj in iter_sse(resp):
            if t_first is None:
                t_first = time.perf_counter()
            last = obj
            ids = merge_stream_ids(ids, obj)
    t1 = time.perf_counter()
    if last is None:
        raise RuntimeError(f"{url}/generate streamed no output")
    return GenResult(output_ids=ids, ttft_s=t_first - t0, e2e_s=t1 - t0,
                     meta_info=last.get("meta_info") or {})


def merge_stream_ids(acc: list[int], chunk: dict) -> list[int]:
    """Output ids so far, for servers streaming cumulative ids (SGLang's default) or deltas
    (`--incremental-streaming-output`): a chunk holding `completion_tokens` ids is cumulative."""
    ids = list(chunk.get("output_ids") or [])
    total = (chunk.get("meta_info") or {}).get("completion_tokens")
    if total is not None and len(ids) == total:
        return ids
    return acc + ids


def post_json(url: str, body: dict | None = None, timeout_s: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")[:500]}
    try:
        return status, json.loads(text) if text else {}
    except json.JSONDecodeError:
        return status, {"text": text[:500]}
