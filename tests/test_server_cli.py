"""`ctxkit serve` as a user runs it: keys from the environment, refusal to start without any."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from ctxkit import read_ledger
from tests.servers import free_port, wait_until_up


def test_serve_refuses_to_start_without_api_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CTXKIT_API_KEYS"}
    done = subprocess.run([sys.executable, "-m", "ctxkit.cli.main", "serve", "--ledger", str(tmp_path / "l.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "open relay" in done.stderr


def test_serve_answers_with_keys_from_the_environment(tmp_path):
    port = free_port()
    ledger = tmp_path / "serve.jsonl"
    env = {**os.environ, "CTXKIT_API_KEYS": "cli-key-00001:cli-team", "CTXKIT_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ctxkit.cli.main", "serve", "--port", str(port), "--ledger", str(ledger),
         "--n-threads", "1", "--n-ctx", "1024"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/healthz", process, "ctxkit serve")
        headers = {"Authorization": "Bearer cli-key-00001"}
        answer = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=300,
                            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert httpx.post(f"{base}/v1/chat/completions", json={"messages": []}).status_code == 401
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    [record] = list(read_ledger(ledger))
    assert record.namespace == "cli-team" and record.status == "ok"
    assert "cli-key-00001" not in output  # the startup line and access log never show a key
