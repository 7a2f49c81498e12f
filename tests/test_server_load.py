"""A bounded concurrent load on the proxy over loopback HTTP: 50 clients, no request lost, every call in
the ledger (the numbers the `proxy-load` benchmark prints, asserted)."""

from __future__ import annotations

from ctxkit import Ledger, Pipeline
from ctxkit.bench import proxy_load


def test_fifty_concurrent_clients_lose_no_request_and_every_call_is_in_the_ledger(llama_backend, tmp_path):
    pipeline = Pipeline(llama_backend, ledger=Ledger(tmp_path / "ledger.jsonl"))
    result = proxy_load.run(pipeline, proxy_load.load_prompts(None), clients=50, calls_per_client=2, max_tokens=4)
    print(proxy_load.table(result))
    assert result["requests"] == 100
    assert result["errors"] == 0, result["errors_by_type"]
    assert result["lost"] == 0
    assert result["answered"] == 100
    assert result["peak_concurrent_requests"] > 1, "the clients never overlapped: not a concurrent load"
    assert result["ledger_lines"] == result["ledger_ok_lines"] == 100
    assert result["answered_missing_from_ledger"] == 0
    assert result["tokens_naive"] == result["tokens_sent"] > 0  # no stages: nothing saved, nothing lost
