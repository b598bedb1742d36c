"""The streaming /generate client and the server-process helper, against local stand-ins."""

import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dualpath.bench import client
from dualpath.bench.servers import ServerError, ServerProcess, http_status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_iter_sse_stops_at_done_and_raises_on_error():
    lines = [b"data: {\"a\": 1}\n", b"\n", b": keep-alive\n", b"data: [DONE]\n", b"data: {}\n"]
    assert list(client.iter_sse(lines)) == [{"a": 1}]
    with pytest.raises(RuntimeError, match="boom"):
        list(client.iter_sse([b'data: {"error": {"message": "boom"}}']))


@pytest.mark.parametrize("incremental", [False, True])
def test_merge_stream_ids(incremental):
    acc = []
    full = [5, 6, 7, 8]
    for i in range(1, len(full) + 1):
        ids = full[i - 1:i] if incremental else full[:i]
        acc = client.merge_stream_ids(acc, {"output_ids": ids,
                                            "meta_info": {"completion_tokens": i}})
    assert acc == full


class _FakeSGLang(BaseHTTPRequestHandler):
    """Streams cumulative output_ids like SGLang's /generate with stream=True."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["sampling_params"]["max_new_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        ids = []
        for i in range(n):
            ids.append(len(body["input_ids"]) + i)
            meta = {"completion_tokens": len(ids), "cached_tokens_details": {"storage": 64}}
            self.wfile.write(b"data: " + json.dumps({"output_ids": ids, "meta_info": meta})
                             .encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


def test_generate_against_a_streaming_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSGLang)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = client.generate(f"http://127.0.0.1:{srv.server_port}", [1, 2, 3], 5)
    finally:
        srv.shutdown()
    assert r.output_ids == [3, 4, 5, 6, 7]
    assert 0 < r.ttft_s <= r.e2e_s
    assert r.cached_tokens_details == {"storage": 64}
    assert r.decode_tok_s is not None and r.decode_tok_s > 0


def test_server_process_health_and_stop(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www/health").write_text("ok")
    port = free_port()
    srv = ServerProcess("web", ["-m", "http.server", str(port), "--bind", "127.0.0.1",
                                "--directory", str(tmp_path / "www")], port,
                        tmp_path / "web.log", python=sys.executable)
    srv.start()
    try:
        assert srv.wait_healthy(30) > 0
        assert http_status(srv.url + "/health") == 200
    finally:
        srv.stop()
    assert srv.proc.poll() is not None
    assert http_status(srv.url + "/health") == 0


def test_server_that_dies_reports_its_log(tmp_path):
    srv = ServerProcess("dies", ["-c", "print('fatal: no GPU'); raise SystemExit(3)"],
                        free_port(), tmp_path / "dies.log", python=sys.executable)
    srv.start()
    with pytest.raises(ServerError, match="exited with 3") as e:
        srv.wait_healthy(30)
    assert "fatal: no GPU" in str(e.value)


def test_server_that_hangs_times_out(tmp_path):
    srv = ServerProcess("hangs", ["-c", "import time; time.sleep(60)"], free_port(),
                        tmp_path / "hangs.log", python=sys.executable)
    srv.start()
    try:
        with pytest.raises(ServerError, match="not healthy after"):
            srv.wait_healthy(1.5)
    finally:
        srv.stop(grace_s=5)
    assert srv.proc.poll() is not None
