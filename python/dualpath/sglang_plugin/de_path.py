"""The two ends of the DE read path, called from the L3 backend's `batch_get_v1`.

Prefill (`prefill_get`): of the pages SGLang's prefetch asks for, the plan's share goes to the
decode's agent as one pull, while the prefill reads the rest itself at the same time. Whatever
the decode could not deliver in time (agent down, timeout, a miss or damaged block there) the
prefill reads itself, so a DE failure costs time, never a page; a page nobody can read is a miss
and SGLang recomputes it.

Decode (`decode_restore`): the decode's own HiCache restore of the prefix (miss-only return)
takes the pages from the DE buffer the agent filled while forwarding them, so the decode node
reads each block from storage once for both uses.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from dualpath.sglang_plugin.peer_memory import describe_region
from dualpath.storage.page_first import host_view

log = logging.getLogger("dualpath.de_path")
_local = threading.local()
_LOCAL_NAMES = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
# each prefetch IO thread (--dualpath-prefetch-io-threads, 8 by default) has at most one call
# on each of these at a time; sized past any such count so none waits for a slot (the reads
# themselves queue on the node's ordered read pool)
_side_pool = ThreadPoolExecutor(32, thread_name_prefix="dualpath-pe-read")
_pull_pool = ThreadPoolExecutor(32, thread_name_prefix="dualpath-pull")
# page copies of decode restores (numpy releases the GIL while it copies: measured 1.85x with
# 2 cores on the CPU VM, 2026-11-27)
_restore_pool = ThreadPoolExecutor(8, thread_name_prefix="dualpath-restore")


def _conn(url: str, timeout: float) -> http.client.HTTPConnection:
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    c = conns.get(url)
    if c is None:
        u = urlsplit(url)
        c = conns[url] = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    c.timeout = timeout
    return c


def _post(url: str, path: str, body: dict, timeout: float) -> tuple[int, bytes, str]:
    data = json.dumps(body).encode()
    for attempt in (0, 1):  # one retry on a kept-alive connection the server closed
        c = _conn(url, timeout)
        try:
            c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read(), r.getheader("Content-Type", "")
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            c.close()
            _local.conns.pop(url, None)
            if attempt:
                raise
        except Exception:
            c.close()
            _local.conns.pop(url, None)
            raise
    raise AssertionError("unreachable")


def _pool_region(pool):
    """(base address, RegionDesc) of a host pool in shared memory, or None."""
    fd = getattr(pool, "fd", None)
    buf = getattr(pool, "kv_buffer", None)
    if fd is None or buf is None or not hasattr(buf, "data_ptr"):
        return None
    nbytes = buf.numel() * buf.element_size()
    return buf.data_ptr(), describe_region(fd, nbytes)


def pull(agent, pool, plan, keys, k_ptrs, v_ptrs) -> list[bool]:
    """Ask the plan's decode agent for `keys` and have them land at k_ptrs/v_ptrs."""
    cfg = agent.cfg
    local = urlsplit(plan.de_agent).hostname in _LOCAL_NAMES
    mode = cfg.forward_mode
    region = _pool_region(pool) if mode == "shm" or (mode == "auto" and local) else None
    if region is None and mode == "shm":
        raise RuntimeError("forward_mode 'shm' needs the host pool in shared memory "
                           '("allocator": "shm" in the storage backend extra config)')
    body = {"rid": plan.rid, "keys": list(keys), "timeout_s": cfg.forward_timeout_s}
    if region is not None:  # same host: one-sided copy into the pool mapped from the memfd
        base, desc = region
        body.update(mode="shm", region=desc.to_dict(), k_offsets=[p - base for p in k_ptrs],
                    v_offsets=[p - base for p in v_ptrs],
                    deadline_mono=time.monotonic() + cfg.forward_timeout_s)
    elif mode in ("auto", "tcp"):  # any host: one-sided writes into the pool over TCP
        served = agent.serve_pool(pool)
        base = served["base"]
        body.update(mode="tcp", region={k: served[k] for k in ("address", "region", "nbytes")},
                    k_offsets=[p - base for p in k_ptrs], v_offsets=[p - base for p in v_ptrs])
    else:
        body["mode"] = "inline"
    # the whole pull is bounded (http.client's timeout is per socket read): past the deadline
    # plus a margin the prefill reads the pages itself; a late shm write cannot land any more
    # (the agent checks the deadline before writing) and a late inline reply is dropped
    limit = cfg.forward_timeout_s + min(5.0, cfg.forward_timeout_s)
    fut = _pull_pool.submit(_post, plan.de_agent, "/dualpath/pull", body, limit)
    status, raw, ctype = fut.result(timeout=limit)
    if status != 200:
        raise RuntimeError(f"decode agent {plan.de_agent} answered {status}: {raw[:300]!r}")
    head_len = 0
    if body["mode"] != "inline":
        ok = json.loads(raw)["ok"]
    else:
        (head_len,) = struct.unpack_from("<Q", raw)
        ok = json.loads(raw[8:8 + head_len])["ok"]
    if len(ok) != len(keys):
        raise RuntimeError(f"decode agent answered {len(ok)} results for {len(keys)} pages")
    if body["mode"] != "inline":
        nbytes = sum(ok) * 2 * agent.adapter.region_bytes
    else:
        rb, pos = agent.adapter.region_bytes, 8 + head_len
        if len(raw) != pos + sum(ok) * 2 * rb:
            raise RuntimeError(f"decode agent sent {len(raw) - pos} bytes for {sum(ok)} pages")
        for good, kp, vp in zip(ok, k_ptrs, v_ptrs, strict=True):
            if good:
                host_view(kp, rb)[:] = memoryview(raw)[pos:pos + rb]
                host_view(vp, rb)[:] = memoryview(raw)[pos + rb:pos + 2 * rb]
                pos += 2 * rb
        nbytes = pos - 8 - head_len
    agent.count_received(nbytes)
    return [bool(x) for x in ok]


def prefill_get(agent, adapter, pool, plan, keys, k_ptrs, v_ptrs) -> list[bool]:
    n_de = plan.de_count(len(keys))
    own = None
    if n_de < len(keys):  # the prefill's share, read over its own NIC meanwhile
        own = _side_pool.submit(adapter.get_pages, keys[n_de:], k_ptrs[n_de:], v_ptrs[n_de:],
                                plan.rid)
    t0 = time.monotonic()
    try:
        got = pull(agent, pool, plan, keys[:n_de], k_ptrs[:n_de], v_ptrs[:n_de]) if n_de else []
    except Exception as e:  # noqa: BLE001  (any DE failure: read those pages here instead)
        log.warning("rid %s: DE pull of %d pages from %s failed after %.2f s (%s); the prefill "
                    "reads them itself", plan.rid, n_de, plan.de_agent, time.monotonic() - t0, e)
        got = [False] * n_de
    missing = [i for i, g in enumerate(got) if not g]
    if missing:
        again = adapter.get_pages([keys[i] for i in missing], [k_ptrs[i] for i in missing],
                                  [v_ptrs[i] for i in missing], plan.rid)
        for i, g in zip(missing, again, strict=True):
            got[i] = g
    return got + (own.result() if own is not None else [])


def decode_restore(agent, adapter, keys, k_ptrs, v_ptrs, rid: str | None = None) -> list[bool]:
    if not len(keys) == len(k_ptrs) == len(v_ptrs):
        raise ValueError("keys, k_ptrs and v_ptrs differ in length")
    slots = agent.buffer.acquire(keys, uses=agent.buffer_uses(rid), rid=rid)
    try:
        rb = agent.buffer.region_bytes

        def copy(s, kp, vp) -> None:
            if s is not None:
                v = agent.buffer.view(s)
                host_view(kp, rb)[:] = v[:rb]
                host_view(vp, rb)[:] = v[rb:]

        list(_restore_pool.map(copy, slots, k_ptrs, v_ptrs))  # pages in parallel
        missing = [i for i, s in enumerate(slots) if s is None]
        got = [s is not None for s in slots]
        agent.count_restore(len(keys) - len(missing), "buffer")
        if missing:  # no room in the buffer: straight from storage into the pool
            again = adapter.get_pages([keys[i] for i in missing], [k_ptrs[i] for i in missing],
                                      [v_ptrs[i] for i in missing], rid)
            for i, g in zip(missing, again, strict=True):
                got[i] = g
            agent.count_restore(sum(again), "storage")
        return got
    finally:
        agent.buffer.release(slots)
