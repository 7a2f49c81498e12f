"""A last stage for pipeline tests: it keeps what would reach the model and answers "ok" itself, so a
test reads exactly what the stages before it pass on (the model's answer is not under test)."""

from __future__ import annotations

from ctxkit.request import ChatRequest
from ctxkit.response import ChatResponse, Usage
from ctxkit.stage import Stage


class Sent(Stage):
    name = "sent"

    def __init__(self) -> None:
        self.seen: list[ChatRequest] = []

    def wrap_call(self, request, call_next):
        self.seen.append(request)
        return ChatResponse({"role": "assistant", "content": "ok"}, "stop", Usage(0, 0), "m", "sent")

    async def awrap_call(self, request, call_next):
        return self.wrap_call(request, call_next)
