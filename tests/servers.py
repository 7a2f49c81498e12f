"""Real servers on 127.0.0.1 for the tests: llama-cpp-python's OpenAI-compatible server with the embedded model."""

from __future__ import annotations

import contextlib
import email.utils
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    """Poll `url` until it answers 200; fail (and kill the process) if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early with status {process.returncode}")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{what} did not answer {url} in {timeout_s:.0f} s")
        time.sleep(0.2)


class LlamaServer:
    """`python -m llama_cpp.server` on a free loopback port, serving the embedded GGUF as `smollm2`."""

    def __init__(self, model_path: Path, log_path: Path, *, n_ctx: int = 4096, n_threads: int = 2) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
             "--model_alias", "smollm2"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            wait_until_up(f"{self.base_url}/models", self.process, f"llama_cpp.server (log: {log_path})")
        except RuntimeError:
            self._log.close()
            raise

    def stop(self) -> None:
        """Kill the server at once (SIGKILL): what a crashed upstream looks like, mid-stream included."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if not self._log.closed:
            self._log.close()


@contextlib.contextmanager
def cut_off_stream(pieces: Sequence[str]) -> Iterator[str]:
    """A fake upstream, for a fault the real server cannot be made to produce: it streams `pieces` as chat
    chunks without a finish_reason, then closes the connection cleanly (an HTTP/1.0 body ends with it).
    Yields its base URL."""

    class CutOff(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in pieces:
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())

    with _serving(CutOff) as base_url:
        yield base_url


@contextlib.contextmanager
def quoting_gateway(status: int = 403) -> Iterator[str]:
    """A fake gateway, for a fault the real server cannot be made to produce: it refuses every call with a 403
    (or `status`: some gateways answer 200 with an error body) whose message quotes the key and the
    X-Tenant-Token header it was sent. Yields its base URL."""

    class Quoting(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            message = f"key {key} is not allowed for tenant {self.headers.get('X-Tenant-Token', '')}"
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with _serving(Quoting) as base_url:
        yield base_url


@contextlib.contextmanager
def faulty_upstream() -> Iterator[str]:
    """A fake upstream, for faults the real server cannot be made to produce, picked by the first path segment:
    base URL `<yielded>/<fault>/v1`. Faults: `keepalive` (one chunk, then only SSE comments), `silent` (never
    answers), `r429-<seconds>` and `r429-date` (a 429 whose Retry-After is seconds or an HTTP date three seconds
    on), `echo401` (a 401 quoting the Authorization header and the path), `unindexed-tools` (two tool calls,
    each whole in one delta without an `index`, as some servers send them), `llama-server-overflow` (llama.cpp's
    own server's 400 for a prompt over its n_ctx: llama-server is not installed here)."""

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n".encode()

    class Faulty(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            body = json.dumps({"error": {"message": message, "type": "error"}}).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                                **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _events(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            fault = self.path.strip("/").split("/")[0]
            if fault == "r429-date":
                return self._error(429, "slow down", {"Retry-After": email.utils.formatdate(time.time() + 3, usegmt=True)})
            if fault.startswith("r429-"):
                return self._error(429, "slow down", {"Retry-After": fault.removeprefix("r429-")})
            if fault == "echo401":
                return self._error(401, f"bad key: {self.headers.get('Authorization', '')} path {self.path}")
            if fault == "silent":
                time.sleep(60)
                return None
            if fault == "llama-server-overflow":  # llama.cpp's own server (server-context.cpp), prompt over n_ctx
                body = json.dumps({"error": {"code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 9412,
                                             "n_ctx": 8192, "message": "request (9412 tokens) exceeds the available "
                                                                       "context size (8192 tokens), try increasing it"}})
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())
                return None
            self._events()
            if fault == "unindexed-tools":
                for call in ({"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                             {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}):
                    self.wfile.write(chunk({"role": "assistant", "tool_calls": [call]}))
                self.wfile.write(chunk({}, "tool_calls") + b"data: [DONE]\n\n")
                return None
            self.wfile.write(chunk({"role": "assistant", "content": "Hel"}))  # keepalive
            self.wfile.flush()
            for _ in range(120):
                time.sleep(0.5)
                try:
                    self.wfile.write(b": ping\n\n")
                    self.wfile.flush()
                except OSError:
                    return None
            return None

    with _serving(Faulty) as base_url:
        yield base_url.removesuffix("/v1")


@contextlib.contextmanager
def _serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on a free loopback port in a daemon thread; yields the base URL an openai client takes."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
