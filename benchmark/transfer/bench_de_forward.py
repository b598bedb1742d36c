"""DE -> PE forward on one 2-GPU host: the two data paths of issue 7 item 3, measured with the
real parts in two processes (the prefill's pools in this one, the decode agent's DE buffer in a
child), on an 8B-shaped model (32 layers, 8 KV heads x 128, bf16, 64-token pages).

- host pool (what the plugin does): the decode agent copies each page's K and V regions from
  its DE buffer into the prefill's page_first host pool in shared memory (`a1`: the transfer
  engine's local copies, as `agent._write` makes them, --workers threads); the prefill later
  loads the pages to its GPU pool (`a2`: copy_kv one layer per call, as HiCache's per-layer
  load does). `a1` runs while the prefix is read from storage; `a2` overlaps the forward.
- direct (not built in the plugin): the decode process writes the pages from its pinned DE
  buffer straight into the prefill's GPU pool, opened with CUDA IPC (`b`: copy_kv, all layers,
  one launch), on the GPUs given by --direct-gpus (1: the decode's GPU reads its own buffer and
  writes over NVLink; 0: the prefill's GPU reads the DE buffer over PCIe). On the prefill's
  critical path unless signalled per layer (sglang_plugin/README.md).

After each path the prefill checks that its GPU pool holds exactly the forwarded pages (byte
compare against the DE buffer, mapped from the decode process's shared memory). Per size:
median seconds and GB/s of each step, JSONL to --out (one row per size). GPU host only:

    python benchmark/transfer/bench_de_forward.py [--pages 64,256] [--repeats 5] [--workers 8]
        [--direct-gpus 1,0] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

LAYERS, HEADS, DIM, PAGE = 32, 8, 128, 64
ROW = HEADS * DIM * 2  # bytes of one token's K (or V) in one layer (bf16)
REGION = PAGE * LAYERS * ROW  # bytes of one page's K (or V) region, all layers


def shared_pinned(nbytes: int, name: str):
    """(fd, mmap, uint8 tensor) of pinned shared memory: a memfd mapped here and registered
    with CUDA (portable), as SGLang's `shm` host-pool allocator makes it."""
    import torch

    fd = os.memfd_create(name)
    os.ftruncate(fd, nbytes)
    mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    t = torch.frombuffer(mm, dtype=torch.uint8)
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 1)  # portable
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister({nbytes} bytes) failed: {err}")
    return fd, mm, t


class _DevicePtr:
    """A raw device address as a tensor source (__cuda_array_interface__)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3}


def forward_offsets(slots, host_pages, host_pages_total: int, region: int = REGION):
    """Byte offsets of the host-pool forward (agent._write): each DE buffer slot's K and V
    regions (slot = K region, V region) to a page_first host page's K and V regions (the pool
    is [K | V], each [pages, tokens, layers, row])."""
    src, dst = [], []
    for s, p in zip(slots, host_pages, strict=True):
        src += [2 * s * region, (2 * s + 1) * region]
        dst += [p * region, (host_pages_total + p) * region]
    return src, dst


def pool_layout(flat, dev_pages: int):
    """SGLang's GPU pool over one [2, layers, slots, heads, dim] allocation (K = [0], V = [1])."""
    import torch

    from dualpath.ops import layout as L

    pool = flat.view(torch.bfloat16).view(2, LAYERS, dev_pages * PAGE, HEADS, DIM)
    return L.device_pool([pool[0, i] for i in range(LAYERS)],
                         [pool[1, i] for i in range(LAYERS)], PAGE)


# ---------------------------------------------------------------- decode side (child process)
def _de_main(conn, slab_pages: int, workers: int) -> None:
    import torch

    from dualpath.ops import layout as L
    from dualpath.ops.kv_copy import copy_kv
    from dualpath.sglang_plugin.peer_memory import PeerRegions, RegionDesc, describe_region
    from dualpath.transfer import TransferBatch, TransferEngine
    from dualpath.transfer.cuda_ipc import IpcRange, open_range

    torch.cuda.set_device(1)
    nbytes = slab_pages * 2 * REGION
    fd, _mm, slab = shared_pinned(nbytes, "dualpath-de-buffer")
    chunk = 1 << 28
    for off in range(0, nbytes, chunk):  # random contents, made on the GPU
        n = min(chunk, nbytes - off)
        slab[off:off + n].copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    slots = L.page_first_slots(slab.view(torch.bfloat16).view(slab_pages, 2, PAGE, LAYERS,
                                                                HEADS, DIM))
    eng = TransferEngine("tcp", num_workers=workers)
    src_region = eng.register(slab.data_ptr(), nbytes, "host")
    conn.send({"slab": describe_region(fd, nbytes).to_dict()})
    peers, dst_region, opened = PeerRegions(), None, {}
    while True:
        msg = conn.recv()
        cmd = msg["cmd"]
        try:
            if cmd == "stop":
                for rng, _ in opened.values():
                    rng.close()
                torch.cuda.cudart().cudaHostUnregister(slab.data_ptr())
                return
            if cmd == "a1":  # DE buffer -> prefill host pool, two region copies per page
                if dst_region is None:
                    dst_region = eng.register_array(peers.map(RegionDesc.from_dict(
                        msg["region"])))
                src_off, dst_off = forward_offsets(msg["slots"], msg["host_pages"],
                                                   msg["host_pages_total"])
                times = []
                for _ in range(msg["repeats"] + 1):  # the first (page faults of the fresh
                    t0 = time.perf_counter()       # mapping) is a warm-up
                    h = eng.submit(TransferBatch.of(src_region, src_off, dst_region, dst_off,
                                                    REGION), priority="bulk")
                    if eng.wait(h, 120.0) != "done":
                        raise RuntimeError(f"forward copy failed: {h.error}")
                    times.append(time.perf_counter() - t0)
                conn.send({"times": times[1:]})
            elif cmd == "b":  # DE buffer -> prefill GPU pool through CUDA IPC
                gpu = msg["gpu"]
                if gpu not in opened:  # one mapping of the handle at a time in this process
                    for rng, _ in opened.values():
                        rng.close()
                    opened.clear()
                    rng = open_range(IpcRange.from_dict(msg["ipc"]), device=gpu)
                    # no device= here: torch would copy to it; the tensor is labelled with the
                    # GPU that holds the memory, copy_kv uses only its addresses and launches
                    # on the stream of the page indices' GPU
                    flat = torch.as_tensor(_DevicePtr(rng.ptr, rng.desc.length))
                    opened[gpu] = (rng, pool_layout(flat, msg["dev_pages"]))
                dst = opened[gpu][1]
                dev = torch.device("cuda", gpu)
                src_pages = torch.tensor(msg["slots"], dtype=torch.int64, device=dev)
                dst_pages = torch.tensor(msg["dev_pages_sel"], dtype=torch.int64, device=dev)
                times = []
                with torch.cuda.device(gpu):
                    for _ in range(msg["repeats"]):
                        torch.cuda.synchronize(gpu)
                        t0 = time.perf_counter()
                        copy_kv(slots, dst, src_pages, dst_pages)
                        torch.cuda.synchronize(gpu)
                        times.append(time.perf_counter() - t0)
                conn.send({"times": times, "pool_device": str(dst.device)})
        except Exception as e:  # noqa: BLE001  (reported to the prefill side, per step)
            conn.send({"error": f"{type(e).__name__}: {e}"})


# ---------------------------------------------------------------- prefill side (this process)
def _median(xs):
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", default="64,256", help="pages forwarded per measurement "
                                                       "(8 MiB each)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=8, help="the agent's copy threads")
    ap.add_argument("--direct-gpus", default="1,0")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import torch

    from dualpath.ops import layout as L
    from dualpath.ops.kv_copy import copy_kv
    from dualpath.sglang_plugin.peer_memory import PeerRegions, RegionDesc, describe_region
    from dualpath.transfer.cuda_ipc import export

    sizes = [int(x) for x in args.pages.split(",") if x]
    if torch.cuda.device_count() < 2:
        print("error: needs 2 GPUs", file=sys.stderr)
        return 2
    if min(sizes) < 1:
        ap.error("--pages must be >= 1")
    most = max(sizes)
    slab_pages, host_pages, dev_pages = most + 8, 2 * most, 2 * most
    torch.cuda.set_device(0)
    flat = torch.empty(2 * LAYERS * dev_pages * PAGE * ROW, dtype=torch.uint8, device="cuda")
    dev = pool_layout(flat, dev_pages)
    hfd, _hmm, host = shared_pinned(2 * host_pages * REGION, "dualpath-pe-host-pool")
    host_layout = L.host_page_first(host.view(torch.bfloat16).view(
        2, host_pages * PAGE, LAYERS, HEADS, DIM), PAGE)
    ipc = export(flat.data_ptr(), flat.numel()).to_dict()
    region = describe_region(hfd, host.numel()).to_dict()

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_de_main, args=(child_conn, slab_pages, args.workers),
                        daemon=True)
    child.start()
    child_conn.close()  # so that a child that dies shows as EOF here, not as a hang
    hello = conn.recv()
    slab = torch.from_numpy(PeerRegions().map(RegionDesc.from_dict(hello["slab"]))).view(
        slab_pages, 2 * REGION)

    def ask(msg):
        conn.send(msg)
        got = conn.recv()
        if "error" in got:
            raise RuntimeError(got["error"])
        return got

    def pool_holds(slot_list, page_list) -> bool:
        """Do the GPU pool's pages hold exactly the given DE buffer slots?"""
        n = len(page_list)
        scratch = torch.empty((n, 2, PAGE, LAYERS, HEADS, DIM), dtype=torch.bfloat16,
                              pin_memory=True)
        copy_kv(dev, L.page_first_slots(scratch),
                torch.tensor(page_list, dtype=torch.int64, device="cuda"),
                torch.arange(n, dtype=torch.int64, device="cuda"))
        torch.cuda.synchronize()
        want = slab[torch.tensor(slot_list)]
        return torch.equal(scratch.view(torch.uint8).view(n, -1), want)

    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        for n in sizes:
            slots = torch.randperm(slab_pages, generator=gen)[:n].tolist()
            hp = torch.randperm(host_pages, generator=gen)[:n].tolist()
            dp = torch.randperm(dev_pages, generator=gen)[:n].tolist()
            nbytes = n * 2 * REGION
            row = {"pages": n, "tokens": n * PAGE, "bytes": nbytes, "workers": args.workers}
            # host-pool path
            a1 = ask({"cmd": "a1", "slots": slots, "host_pages": hp, "host_pages_total":
                      host_pages, "region": region, "repeats": args.repeats})["times"]
            flat.zero_()
            hp_gpu = torch.tensor(hp, dtype=torch.int64, device="cuda")
            dp_gpu = torch.tensor(dp, dtype=torch.int64, device="cuda")
            a2 = []
            for _ in range(args.repeats + 1):  # the first is a warm-up
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                for layer in range(LAYERS):
                    copy_kv(host_layout, dev, hp_gpu, dp_gpu, src_layers=[layer],
                            dst_layers=[layer])
                end.record()
                end.synchronize()
                a2.append(start.elapsed_time(end) / 1e3)
            a2 = a2[1:]
            row.update(a1_s=_median(a1), a2_s=_median(a2), host_path_ok=pool_holds(slots, dp))
            # direct path, per GPU that runs the copy
            for gpu in [int(x) for x in args.direct_gpus.split(",") if x]:
                flat.zero_()
                torch.cuda.synchronize()
                try:
                    got = ask({"cmd": "b", "gpu": gpu, "ipc": ipc, "dev_pages": dev_pages,
                               "slots": slots, "dev_pages_sel": dp, "repeats": args.repeats + 1})
                    row[f"b_gpu{gpu}_s"] = _median(got["times"][1:])
                    row[f"b_gpu{gpu}_ok"] = pool_holds(slots, dp)
                    row[f"b_gpu{gpu}_pool_device"] = got["pool_device"]
                except RuntimeError as e:
                    row[f"b_gpu{gpu}_error"] = str(e)
            for k in [k for k in row if k.endswith("_s") and row[k]]:
                row[k.replace("_s", "_gbps")] = round(nbytes / row[k] / 1e9, 2)
            row["gpu"] = torch.cuda.get_device_name(0)
            row["date"] = time.strftime("%Y-%m-%d")
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        try:
            conn.send({"cmd": "stop"})
        except OSError:
            pass
        child.join(30)
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    if args.out:
        with args.out.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    ok = bool(rows) and all(r.get("host_path_ok") and all(
        v for k, v in r.items() if k.endswith("_ok")) and not any(
        k.endswith("_error") for k in r) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
