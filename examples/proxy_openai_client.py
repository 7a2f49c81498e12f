"""An unchanged OpenAI client app, pointed at `ctxkit serve`.

Starts the proxy in this process (the same app `ctxkit serve` runs) over the embedded local model, or
in front of a remote OpenAI-compatible server with --upstream, then talks to it with the stock `openai`
client: only base_url and api_key differ from talking to OpenAI. Prints the answers, a streamed answer,
the proxy's ledger lines and a few of its Prometheus metrics.

    python examples/proxy_openai_client.py
    python examples/proxy_openai_client.py --upstream http://127.0.0.1:8080/v1 --upstream-model smollm2 \
        --upstream-gguf path/to/model.gguf

In production run the proxy on its own: CTXKIT_API_KEYS="<key>:<namespace>" ctxkit serve --port 8000
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
from pathlib import Path

import httpx
import openai

from ctxkit import GGUFPrompt, Ledger, LlamaCppBackend, OpenAIBackend, Pipeline, read_ledger
from ctxkit.demo import ledger_line
from ctxkit.server import ApiKeys, create_app, serve_in_thread
from ctxkit.stages import default_stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", help="an OpenAI-compatible base URL to put the proxy in front of")
    parser.add_argument("--upstream-model", default="gpt-4o-mini")
    parser.add_argument("--upstream-gguf", type=Path, help="count tokens with this GGUF (a non-OpenAI model)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--ledger", type=Path, default=None,
                        help="keep the proxy's ledger in this file (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ctxkit-proxy-") as scratch:
        run(args, args.ledger or Path(scratch) / "ledger.jsonl")


def run(args: argparse.Namespace, ledger_path: Path) -> None:

    if args.upstream:
        counter = GGUFPrompt.from_gguf(args.upstream_gguf) if args.upstream_gguf else None
        backend = OpenAIBackend(args.upstream_model, base_url=args.upstream, counter=counter)
    else:
        backend = LlamaCppBackend(n_threads=args.n_threads)
    key = f"sk-demo-{secrets.token_hex(12)}"  # one tenant; a real deployment lists its keys in CTXKIT_API_KEYS
    pipeline = Pipeline(backend, stages=default_stages(backend), ledger=Ledger(ledger_path))

    with serve_in_thread(create_app(pipeline, ApiKeys({key: "demo-team"}))) as base_url:
        print(f"proxy at {base_url}/v1 over {backend.name} / {backend.model}")
        # The app's code, unchanged except for base_url and api_key:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key)
        print("models:", [m.id for m in client.models.list().data])

        completion = client.chat.completions.create(
            model=backend.model,
            messages=[{"role": "system", "content": "You are a concise assistant."},
                      {"role": "user", "content": "Give me one tip for writing clear emails."}],
            max_tokens=args.max_tokens, temperature=0,
        )
        print(f"completion -> {completion.choices[0].message.content!r} "
              f"(prompt {completion.usage.prompt_tokens}, completion {completion.usage.completion_tokens} tokens)")

        stream = client.chat.completions.create(
            model=backend.model, messages=[{"role": "user", "content": "Name two planets."}],
            max_tokens=args.max_tokens, temperature=0, stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        print(f"stream -> {text!r}")

        try:
            openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0).models.list()
        except openai.AuthenticationError as exc:
            print(f"wrong key -> HTTP {exc.status_code}")

        metrics = httpx.get(f"{base_url}/metrics").text
        wanted = ("ctxkit_tokens_naive_total", "ctxkit_tokens_sent_total", "ctxkit_request_seconds_count")
        for line in metrics.splitlines():
            if line.startswith(wanted):
                print(f"metric  {line}")

    print(f"ledger {ledger_path}:")
    for record in read_ledger(ledger_path):
        print(f"{ledger_line(record)} namespace={record.namespace} stream={record.stream}")


if __name__ == "__main__":
    main()
