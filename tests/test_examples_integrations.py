"""The integration examples run as written (as subprocesses, on the embedded model) and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def test_langchain_chain_example_runs_a_chain_a_stream_and_a_tool_call():
    out = run_example("langchain_chain.py", "--max-tokens", "4", "--n-threads", "1")
    assert re.search(r"^invoke -> '.+'$", out, re.MULTILINE), out
    assert re.search(r"^stream -> \d+ chunks", out, re.MULTILINE), out
    assert re.search(r"^tool call -> convert_currency\(\{.*'amount'.*'currency'.*\}\) = ", out, re.MULTILINE), out
    assert len(re.findall(r"^\s+\[ledger\] call-", out, re.MULTILINE)) == 3
    assert re.search(r"^3 calls: \d+ prompt tokens asked, \d+ sent, \d+ generated$", out, re.MULTILINE), out


def test_proxy_example_talks_to_the_proxy_with_the_stock_openai_client():
    out = run_example("proxy_openai_client.py", "--max-tokens", "4", "--n-threads", "1")
    assert re.search(r"^proxy at http://127\.0\.0\.1:\d+/v1 over llama\.cpp", out, re.MULTILINE), out
    assert re.search(r"^completion -> '.*' \(prompt \d+, completion [1-4] tokens\)$", out, re.MULTILINE), out
    assert "stream -> " in out and "wrong key -> HTTP 401" in out
    assert 'ctxkit_tokens_naive_total{namespace="demo-team"}' in out
    ledger_lines = re.findall(r"^\s+\[ledger\] call-.* namespace=demo-team stream=(True|False)$", out, re.MULTILINE)
    assert ledger_lines == ["False", "True"], out
