"""A LangChain chain through ctxkit, on the embedded local model.

`prompt | model | parser` as in any LangChain app, with CtxkitChatModel as the model: the chain runs
unchanged (invoke, stream, tools), and every model call leaves a ledger line saying what was sent and
what each stage saved.

    python examples/langchain_chain.py [--ledger calls.jsonl] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool

from adapters.langchain import CtxkitChatModel
from ctxkit import Ledger, LlamaCppBackend, Pipeline
from ctxkit.demo import ledger_line
from ctxkit.stages import default_stages


@tool
def convert_currency(amount: float, currency: str) -> str:
    """Convert an amount in euros into another currency (ISO code such as USD or GBP)."""
    return f"{amount * 1.08:.2f} {currency}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ledger", type=Path, default=None, help="also append the ledger to this file")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--n-threads", type=int, default=None)
    args = parser.parse_args()

    backend = LlamaCppBackend(n_threads=args.n_threads)
    ledger = Ledger(args.ledger)
    pipeline = Pipeline(backend, stages=default_stages(backend), ledger=ledger)
    model = CtxkitChatModel(pipeline=pipeline, temperature=0, seed=7, max_tokens=args.max_tokens)
    print(f"model {backend.model} through ctxkit; stages: {[s.name for s in pipeline.stages]}")

    prompt = ChatPromptTemplate.from_messages([
        ("system", "You are a travel assistant. Answer in one short sentence."),
        ("user", "{question}"),
    ])
    chain = prompt | model | StrOutputParser()

    answer = chain.invoke({"question": "What should I pack for a weekend in Lisbon?"})
    print(f"invoke -> {answer!r}")
    print(ledger_line(ledger.records[-1]))

    pieces = list(chain.stream({"question": "Name one museum in Lisbon."}))
    print(f"stream -> {len(pieces)} chunks: {''.join(pieces)!r}")
    print(ledger_line(ledger.records[-1]))

    with_tools = prompt | model.bind_tools([convert_currency], tool_choice="any", max_tokens=48)
    message = with_tools.invoke({"question": "How much is 120 euros in USD?"})
    for call in message.tool_calls:
        print(f"tool call -> {call['name']}({call['args']}) = {convert_currency.invoke(call['args'])}")
    if not message.tool_calls:
        print(f"no tool call; the model said {message.content!r}")
    print(ledger_line(ledger.records[-1]))

    records = list(ledger.records)
    print(f"{len(records)} calls: {sum(r.tokens_naive for r in records)} prompt tokens asked, "
          f"{sum(r.tokens_sent for r in records)} sent, {sum(r.tokens_out for r in records)} generated")


if __name__ == "__main__":
    main()
