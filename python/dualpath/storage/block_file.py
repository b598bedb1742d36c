"""The on-disk format of one Full Block: a 4 KiB header, then the payload.

A Full Block holds all layers' K and V of `page_size` tokens, layer-major: for each layer,
K then V, each ``page_size x num_kv_heads x head_dim`` elements. So layer l's slice (a Layer
Block) is the contiguous range ``[l * layer_bytes, (l + 1) * layer_bytes)`` of the payload.

Header (little-endian), padded to HEADER_BYTES so the payload starts page-aligned (O_DIRECT- and
mmap-friendly; 0.05% of an 8 MiB block):

    magic 8s  version u16  key_len u16  reserved u32  payload_len u64  checksum u64 (XXH3-64)
    fingerprint 32s (sha256 of the model/layout description)
    num_layers u32  page_size u32  num_kv_heads u32  head_dim u32  dtype_bytes u16  kv_parts u16
    key (utf-8, key_len bytes)

A reader trusts nothing: wrong magic or version, a foreign fingerprint or geometry, a short
file or a checksum mismatch all raise BlockError, which callers treat as a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass

import xxhash

MAGIC = b"DPKVBLK\x00"
VERSION = 1
HEADER_BYTES = 4096
_FIXED = struct.Struct("<8sHHIQQ32sIIIIHH")
DIGEST_OFFSET = struct.calcsize("<8sHHIQ")  # the payload checksum's place in the header
RESERVED_OFFSET = struct.calcsize("<8sHH")  # a u32 readers ignore
FIXED_BYTES = _FIXED.size  # the key follows
MAX_KEY_BYTES = HEADER_BYTES - _FIXED.size


class BlockError(Exception):
    """The file is not a valid block for this store (a miss, never data)."""


@dataclass(frozen=True)
class BlockGeometry:
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    kv_parts: int = 2  # K and V; 1 for MLA's single latent buffer

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockGeometry.{name} must be a positive int, got {value!r}")
        if self.kv_parts not in (1, 2):
            raise ValueError("BlockGeometry.kv_parts must be 1 (MLA) or 2 (K and V)")

    @property
    def part_bytes(self) -> int:
        """One layer's K (or V) for the block's tokens."""
        return self.page_size * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def layer_bytes(self) -> int:
        """One Layer Block: K then V of one layer."""
        return self.kv_parts * self.part_bytes

    @property
    def payload_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def layer_range(self, layer: int) -> tuple[int, int]:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return layer * self.layer_bytes, (layer + 1) * self.layer_bytes


def fingerprint(model: str, geometry: BlockGeometry, layout: str = "layer_major_v1",
                **extra: object) -> bytes:
    """sha256 over the model name, geometry, payload layout and anything else that must match
    (e.g. tp_rank/tp_size for head-split KV), so incompatible servers never share blocks."""
    desc = {"model": model, "layout": layout, **asdict(geometry), **extra}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).digest()


def checksum(payload) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def encode_header(key: str, fp: bytes, geometry: BlockGeometry, payload_len: int,
                  digest: int) -> bytes:
    kb = key.encode()
    if len(kb) > MAX_KEY_BYTES:
        raise ValueError(f"key of {len(kb)} bytes exceeds {MAX_KEY_BYTES}")
    g = geometry
    head = _FIXED.pack(MAGIC, VERSION, len(kb), 0, payload_len, digest, fp, g.num_layers,
                       g.page_size, g.num_kv_heads, g.head_dim, g.dtype_bytes, g.kv_parts)
    return (head + kb).ljust(HEADER_BYTES, b"\x00")


def check_header(raw: bytes, key: str, fp: bytes, geometry: BlockGeometry) -> int:
    """Validate a header against what the reader expects; return the payload checksum."""
    if len(raw) < HEADER_BYTES:
        raise BlockError(f"short header ({len(raw)} bytes)")
    (magic, version, key_len, _, payload_len, digest, file_fp, *geo) = _FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise BlockError("not a DualPath block (bad magic)")
    if version != VERSION:
        raise BlockError(f"block format version {version}, this reader knows {VERSION}")
    if file_fp != fp:
        raise BlockError("foreign fingerprint (another model, layout or TP split)")
    if tuple(geo) != (geometry.num_layers, geometry.page_size, geometry.num_kv_heads,
                      geometry.head_dim, geometry.dtype_bytes, geometry.kv_parts):
        raise BlockError(f"geometry {tuple(geo)} differs from the store's")
    if payload_len != geometry.payload_bytes:
        raise BlockError(f"payload_len {payload_len} != {geometry.payload_bytes}")
    file_key = raw[_FIXED.size:_FIXED.size + key_len].decode(errors="replace")
    if file_key != key:
        raise BlockError(f"file holds key {file_key!r}")
    return digest


def _readv_full(fd: int, bufs: list[memoryview]) -> int:
    """Fill `bufs` in order from `fd` (one readv, normally); returns the bytes read, less than
    their total only at end of file."""
    total = got = 0
    for b in bufs:
        total += b.nbytes
    while got < total:
        rest, skip = [], got
        for b in bufs:
            if skip >= b.nbytes:
                skip -= b.nbytes
                continue
            rest.append(b[skip:])
            skip = 0
        n = os.readv(fd, rest)
        if n == 0:
            break
        got += n
    return got


def read_block_into(path: str, key: str, fp: bytes, geometry: BlockGeometry, out) -> None:
    """Read the payload at `path` into the writable buffer `out` (exactly payload_bytes long)
    and verify it. On BlockError the contents of `out` are undefined.

    Header, payload and one byte past them come in one readv, and the checksum is one call:
    each call that releases the GIL must win it back, which takes up to the interpreter's
    switch interval (5 ms) while another thread runs Python, as an SGLang scheduler always
    does. Reading in 256 KiB chunks (64 such round trips per 8 MiB block) made a server's
    storage reads ~0.3 GB/s per request on the GPU host, and 0.02 GB/s against a busy thread
    on the CPU VM (benchmark/storage/bench_gil.py)."""
    view = memoryview(out).cast("B")
    if view.nbytes != geometry.payload_bytes:
        raise ValueError(f"buffer of {view.nbytes} bytes for a {geometry.payload_bytes}-byte block")
    header, extra = bytearray(HEADER_BYTES), bytearray(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = _readv_full(fd, [memoryview(header), view, memoryview(extra)])
    finally:
        os.close(fd)
    digest = check_header(bytes(header[:min(got, HEADER_BYTES)]), key, fp, geometry)
    if got < HEADER_BYTES + view.nbytes:
        raise BlockError(f"short payload ({got - HEADER_BYTES} of {view.nbytes} bytes)")
    if got > HEADER_BYTES + view.nbytes:
        raise BlockError("file is longer than header + payload")
    if xxhash.xxh3_64_intdigest(view) != digest:
        raise BlockError("payload checksum mismatch")


def write_block(path: str, key: str, fp: bytes, geometry: BlockGeometry, payload) -> None:
    """Write atomically: a unique temp file in the same directory, then rename over `path`.
    Concurrent writers of one key each rename a complete file; the last one wins."""
    view = memoryview(payload).cast("B")
    if view.nbytes != geometry.payload_bytes:
        raise ValueError(f"payload of {view.nbytes} bytes for a {geometry.payload_bytes}-byte "
                         "block")
    header = encode_header(key, fp, geometry, view.nbytes, checksum(view))
    tmp = f"{path}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    try:
        with open(tmp, "wb", buffering=0) as f:
            f.write(header)
            done = 0
            while done < view.nbytes:
                done += f.write(view[done:])
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
