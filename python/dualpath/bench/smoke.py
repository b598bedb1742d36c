"""Stock SGLang smoke test on a GPU host: one HiCache server with L3 storage hits, optionally PD.

single: one server (dummy weights, triton attention, HiCache with the `file` L3 backend on a
  local directory). A prompt is sent, its KV is written through to L3, the device/host cache is
  flushed, and the same prompt is sent again: it must be served from storage (meta_info
  cached_tokens_details.storage) and give the same greedy output; a third send is a device hit.
  The OpenAI chat API is checked against the shipped tokenizer.
pd (needs 2 GPUs): a prefill server on GPU 0 and a decode server on GPU 1 (PD over NIXL/UCX);
  the same prompt goes to both with bootstrap_host/port/room and must give the same output as
  the single server (dummy weights are seeded, so both servers hold the same model).

Every check raises `SmokeFailure`; numbers go to `summary.json` in the output directory.
Normally run through scripts/gpu_smoke.sh, which installs the bundle first.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from dualpath import version
from dualpath.bench import client
from dualpath.bench.servers import ServerError, ServerProcess

log = logging.getLogger("dualpath.smoke")
ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MODEL = ROOT / "configs/models/llama-3.1-8b-dummy"


class SmokeFailure(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SmokeFailure(what)
    log.info("PASS %s", what)


def server_args(model: Path, port: int, extra: list[str]) -> list[str]:
    return ["-m", "sglang.launch_server", "--model-path", str(model), "--load-format", "dummy",
            "--attention-backend", "triton", "--sampling-backend", "pytorch",
            "--disable-cuda-graph", "--page-size", "64", "--host", "127.0.0.1",
            "--port", str(port), "--mem-fraction-static", "0.5", "--log-level", "info", *extra]


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 100000) for _ in range(n)]


def result_row(tag: str, r: client.GenResult) -> dict:
    return {"tag": tag, "ttft_s": round(r.ttft_s, 4), "e2e_s": round(r.e2e_s, 4),
            "completion_tokens": r.completion_tokens,
            "decode_tok_s": round(r.decode_tok_s, 1) if r.decode_tok_s else None,
            "cached_tokens": r.meta_info.get("cached_tokens"),
            "cached_tokens_details": r.cached_tokens_details}


def count_blocks(store: Path) -> int:
    """Stored pages: SGLang's file backend writes <key>.bin, ours <rank dir>/ab/cd/<key>."""
    return sum(1 for p in store.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
               and p.name != "STORE.json")


def l3_args(backend: str, store: Path) -> tuple[list[str], dict]:
    """Server flags and environment for the L3 backend under test."""
    if backend == "file":
        return (["--hicache-storage-backend", "file"],
                {"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": str(store)})
    extra = {"backend_name": "dualpath", "module_path": "dualpath.sglang_plugin.storage_backend",
             "class_name": "DualPathStorage", "interface_v1": 1, "root": str(store),
             "node": "smoke-node"}
    return (["--hicache-storage-backend", "dynamic", "--hicache-mem-layout", "page_first",
             "--hicache-storage-backend-extra-config", json.dumps(extra)], {})


def wait_for_l3(store: Path, pages: int, timeout_s: float) -> int:
    """Wait until the L3 backend holds `pages` pages (write-through is asynchronous)."""
    t0 = time.time()
    n = 0
    while time.time() - t0 < timeout_s:
        n = count_blocks(store)
        if n >= pages:
            break
        time.sleep(0.5)
    return n


def run_single(args, out: Path, summary: dict) -> None:
    store = Path(args.l3_dir)
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    l3_flags, l3_env = l3_args(args.l3_backend, store)
    srv = ServerProcess("single", server_args(args.model, args.port, [
        "--max-total-tokens", str(args.max_total_tokens), "--enable-hierarchical-cache",
        "--hicache-ratio", "2", "--enable-cache-report", "--hicache-write-policy",
        "write_through", *l3_flags]), args.port, out / "server_single.log", env=l3_env)
    try:
        srv.start()
        summary["startup_single_s"] = round(srv.wait_healthy(args.health_timeout), 1)
        a = prompt(1, args.prompt_len)
        n_out = args.max_new_tokens
        cold = client.generate(srv.url, a, n_out)
        check(cold.completion_tokens == n_out, f"cold request generated {n_out} tokens")
        full_pages = (args.prompt_len - 1) // 64  # the last prompt token is always recomputed
        files = wait_for_l3(store, full_pages, 60)
        check(files >= full_pages, f"write-through put {files} >= {full_pages} pages into L3")
        status = 0
        for _ in range(30):  # flush is refused while requests are still in flight
            status, _ = client.post_json(srv.url + "/flush_cache")
            if status == 200:
                break
            time.sleep(1)
        check(status == 200, "/flush_cache emptied the device and host caches")
        l3 = client.generate(srv.url, a, n_out)
        dev = client.generate(srv.url, a, n_out)
        d3, dd = l3.cached_tokens_details, dev.cached_tokens_details
        summary["single"] = [result_row("cold", cold), result_row("after_flush_l3", l3),
                             result_row("repeat_device", dev)]
        check(d3.get("storage", 0) >= full_pages * 64 - 64,
              f"after flush the prefix came from storage: {d3}")
        check(dd.get("device", 0) >= full_pages * 64 - 64, f"repeat hit the device cache: {dd}")
        check(l3.output_ids == dev.output_ids, "L3-loaded KV gives the device-hit greedy output")
        check(l3.output_ids == cold.output_ids, "L3-loaded KV gives the cold greedy output")
        summary["single_output_ids"] = cold.output_ids
        summary["l3_files"] = files
        chat_check(srv.url, args.model, summary)
    finally:
        srv.stop()


def chat_check(url: str, model: Path, summary: dict) -> None:
    """The chat API runs on the shipped tokenizer and agrees with it on the prompt length."""
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "List three prime numbers."}]
    status, resp = client.post_json(url + "/v1/chat/completions", {
        "model": str(model), "messages": msgs, "max_tokens": 16, "temperature": 0.0})
    check(status == 200, f"/v1/chat/completions answered 200 ({status}: {str(resp)[:200]})")
    tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    want = len(tok(text, add_special_tokens=False)["input_ids"])
    got = resp["usage"]["prompt_tokens"]
    check(got == want, f"chat prompt_tokens {got} == local tokenizer's {want}")
    summary["chat"] = {"prompt_tokens": got, "completion_tokens":
                       resp["usage"]["completion_tokens"],
                       "text": resp["choices"][0]["message"]["content"][:200]}


def pd_pair(model: Path, backend: str, out: Path, prefill_port: int, decode_port: int,
            bootstrap_port: int) -> tuple[ServerProcess, ServerProcess]:
    """A stock SGLang prefill server on GPU 0 and a decode server on GPU 1."""
    common = ["--disaggregation-transfer-backend", backend]
    pre = ServerProcess("prefill", server_args(model, prefill_port, common + [
        "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
        str(bootstrap_port)]), prefill_port, out / "server_prefill.log",
        env={"CUDA_VISIBLE_DEVICES": "0"})
    dec = ServerProcess("decode", server_args(model, decode_port, common + [
        "--disaggregation-mode", "decode"]), decode_port, out / "server_decode.log",
        env={"CUDA_VISIBLE_DEVICES": "1"})
    return pre, dec


def start_pd(pre: ServerProcess, dec: ServerProcess, timeout_s: float) -> float:
    """Start both at once (they compile in parallel); return seconds until both are healthy."""
    t0 = time.time()
    pre.start()
    dec.start()
    pre.wait_healthy(timeout_s)
    dec.wait_healthy(timeout_s)
    return round(time.time() - t0, 1)


def run_pd(args, out: Path, summary: dict) -> None:
    boot_port = args.port + 998
    pre, dec = pd_pair(args.model, args.pd_backend, out, args.port + 10, args.port + 20,
                       boot_port)
    try:
        summary["startup_pd_s"] = start_pd(pre, dec, args.health_timeout)
        a, rows, outs = prompt(1, args.prompt_len), [], []
        for tag in ("pd_cold", "pd_repeat"):
            room = random.randrange(2**63 - 1)
            extra = {"bootstrap_host": "127.0.0.1", "bootstrap_port": boot_port,
                     "bootstrap_room": room}
            body = {"input_ids": a, "sampling_params": {"max_new_tokens": args.max_new_tokens,
                                                        "temperature": 0.0, "ignore_eos": True},
                    **extra}
            with cf.ThreadPoolExecutor(1) as ex:
                fp = ex.submit(client.post_json, pre.url + "/generate", body, 600)
                rd = client.generate(dec.url, a, args.max_new_tokens, extra=extra)
                status, _ = fp.result()
            check(status == 200, f"{tag}: prefill server answered 200 ({status})")
            check(rd.completion_tokens == args.max_new_tokens,
                  f"{tag}: decode server generated {args.max_new_tokens} tokens")
            rows.append(result_row(tag, rd))
            outs.append(rd.output_ids)
        summary["pd"] = rows
        check(outs[0] == outs[1], "PD: the repeat gives the same greedy output")
        if "single_output_ids" in summary:
            check(outs[0] == summary["single_output_ids"],
                  "PD output equals the single server's output (same seeded dummy weights)")
    finally:
        dec.stop()
        pre.stop()


def gpu_facts() -> dict:
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                        "--format=csv,noheader"], capture_output=True, text=True)
    gpus = [ln.strip() for ln in q.stdout.splitlines() if ln.strip()]
    return {"gpus": gpus, "gpu_name": gpus[0].split(",")[0] if gpus else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stock SGLang smoke test (see module docstring).")
    ap.add_argument("--pd", action="store_true", help="also run prefill+decode (2 GPUs, NIXL)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model dir (dummy weights)")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-total-tokens", type=int, default=32768,
                    help="device KV pool in tokens; the host pool is twice that (pinned)")
    ap.add_argument("--l3-dir", default="/dev/shm/dualpath-smoke-l3",
                    help="directory of the L3 backend (wiped first)")
    ap.add_argument("--l3-backend", choices=["file", "dualpath"], default="file",
                    help="SGLang's file backend (stock) or the DualPath block store")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--pd-backend", default="nixl", help="--disaggregation-transfer-backend")
    ap.add_argument("--health-timeout", type=float, default=400)
    ap.add_argument("--out", type=Path, required=True, help="logs and summary.json go here")
    ap.add_argument("--setup-s", type=float, help="install time to record in the summary")
    args = ap.parse_args(argv)
    if args.prompt_len < 128:
        ap.error("--prompt-len must be >= 128 (two pages) to show storage hits")
    if args.max_total_tokens < args.prompt_len + args.max_new_tokens:
        ap.error("--max-total-tokens must hold the prompt and its output")
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="[smoke %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    summary = {"date": time.strftime("%Y-%m-%d"), "git_sha": version.git_sha(), **gpu_facts(),
               "host": socket.gethostname(), "model": args.model.name,
               "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
               "l3_backend": args.l3_backend, "setup_s": args.setup_s, "ok": False}
    try:
        run_single(args, args.out, summary)
        if args.pd:
            run_pd(args, args.out, summary)
        summary["ok"] = True
    except (SmokeFailure, ServerError) as e:
        summary["failure"] = str(e)
        log.error("FAIL %s", e)
    finally:
        summary.pop("single_output_ids", None)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        log.info("summary: %s", json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
