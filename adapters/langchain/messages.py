"""Conversions between LangChain messages and the OpenAI chat format ctxkit works in.

ctxkit's requests, responses and stream chunks are OpenAI-format dicts; LangChain speaks BaseMessage.
Tool calls cross in both directions: an OpenAI `tool_calls` entry carries its arguments as a JSON
string, a LangChain `tool_calls` entry as a dict (and arguments that do not parse become
`invalid_tool_calls`, as LangChain's own OpenAI integration does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ToolMessage,
    convert_to_messages,
    convert_to_openai_messages,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.utils.function_calling import convert_to_openai_tool

from ctxkit.errors import InvalidMessageError
from ctxkit.quarantine_marks import METADATA_KEY as QUARANTINE_KEY
from ctxkit.quarantine_marks import fingerprint
from ctxkit.response import ChatResponse, Usage
from ctxkit.validation import CONTENT_PART_TYPES


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as OpenAI chat messages (assistant tool calls with JSON-string arguments).

    A call whose arguments did not parse is an `invalid_tool_calls` entry, which LangChain's converter
    drops. An agent answers it with a ToolMessage ("error: arguments are not JSON"), and that message
    would then answer no call, which every provider rejects. So a call that a later ToolMessage answers
    is kept, with its arguments as the model wrote them; an unanswered one is left out, as LangChain does."""
    return [m for _, group in _converted_groups(messages) for m in group]


def _converted_groups(messages: Sequence[BaseMessage]) -> list[tuple[BaseMessage, list[dict[str, Any]]]]:
    """Each LangChain message with the OpenAI messages it became (to_openai_messages is their concatenation)."""
    # One message may become several: a HumanMessage's Anthropic-style tool_result blocks become tool
    # messages, which go first, since results must follow the call they answer before the next turn.
    converted = [(original, sorted(_convert_one(original, index), key=lambda m: m.get("role") != "tool"))
                 for index, original in enumerate(messages)]
    answered = {m.get("tool_call_id") for _, group in converted for m in group if m.get("role") == "tool"}
    # Only the model's own turns carry its reasoning blocks; a user's PDF or other provider block is no
    # reasoning: dropping it silently answered without it (it stays, and validation names it).
    return [(original, [_assistant_turn(m, original, answered) if m.get("role") == "assistant" else m
                        for m in group])
            for original, group in converted]


def _convert_one(message: BaseMessage, index: int) -> list[dict[str, Any]]:
    """One LangChain message in the OpenAI form. LangChain's converter raises a bare ValueError for a block it
    cannot express (a v1 `text-plain` document block): a request error naming the message, as validation names
    any other part it refuses, so LangChain's handling (`ModelInvalidRequestError`) and `except RequestError` see it."""
    try:
        return convert_to_openai_messages([message])
    except ValueError as exc:
        raise InvalidMessageError(str(exc), index, "content") from exc
    except (KeyError, TypeError) as exc:  # a content block that is no block: `[{"result": 5}]` has no "type"
        detail = f"a content block has no {exc} key" if isinstance(exc, KeyError) else str(exc)
        raise InvalidMessageError(f"{detail}; give text, or blocks such as {{'type': 'text', 'text': ...}}",
                                  index, "content") from exc


def failed_tool_results(originals: Sequence[BaseMessage], converted: Sequence[dict[str, Any]],
                        metadata: dict[str, Any]) -> dict[str, Any]:
    """`metadata` with the results LangChain marked failed (a ToolMessage with `status="error"`, as
    ToolNode and ToolErrorMiddleware write them) quarantined. The OpenAI form has no status, so without
    the mark the cache stored answers built on a failed tool call and summaries kept it as a fact."""
    failed = {m.tool_call_id for m in originals if isinstance(m, ToolMessage) and m.status == "error"}
    marks = {fingerprint(m): "tool_error: the tool call failed (ToolMessage status='error')"
             for m in converted if m.get("role") == "tool" and m.get("tool_call_id") in failed}
    if not marks:
        return metadata
    return {**metadata, QUARANTINE_KEY: {**(metadata.get(QUARANTINE_KEY) or {}), **marks}}


def _assistant_turn(message: dict[str, Any], original: BaseMessage, answered: set[Any]) -> dict[str, Any]:
    message = _openai_parts_only(message)
    return _with_invalid_calls(message, original, answered) if isinstance(original, AIMessage) else message


def _openai_parts_only(message: dict[str, Any]) -> dict[str, Any]:
    """`message` with only the content parts the OpenAI format has. A reasoning model's `thinking` /
    `reasoning` blocks are the model's own (a wrapped model still gets them: the caller's objects go to it
    untouched), not prompt text that ctxkit can validate, count or send to an OpenAI-style backend."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    kept = [part for part in content if not isinstance(part, dict) or part.get("type") in CONTENT_PART_TYPES]
    if len(kept) == len(content):
        return message
    if all(isinstance(p, dict) and p.get("type") == "text" for p in kept):
        return {**message, "content": "".join(p.get("text") or "" for p in kept)}
    return {**message, "content": kept}


def _with_invalid_calls(message: dict[str, Any], original: AIMessage, answered: set[Any] | None) -> dict[str, Any]:
    """`message` with the AIMessage's invalid tool calls added back (only the answered ones unless
    `answered` is None), and OpenAI's null content beside tool calls."""
    kept = [call for call in original.invalid_tool_calls
            if call.get("id") and (answered is None or call["id"] in answered)]
    calls = list(message.get("tool_calls") or []) + [
        {"type": "function", "id": call["id"],
         "function": {"name": call.get("name") or "", "arguments": call.get("args") or ""}}
        for call in kept
    ]
    if not calls:
        return message
    return {**message, "tool_calls": calls, "content": message.get("content") or None}


def from_openai_messages(messages: Sequence[dict[str, Any]]) -> list[BaseMessage]:
    """OpenAI chat messages as LangChain messages."""
    return convert_to_messages([_without_none_content(m) for m in messages])


# Where a request carries the LangChain messages it was made from (metadata is never sent to a backend).
ORIGINALS_KEY = "ctxkit.langchain_messages"


class OriginalMessages:
    """The LangChain messages a request was converted from, found again by their OpenAI form.

    The OpenAI form cannot carry everything: an Anthropic `cache_control` block, a ToolMessage's `status`
    and `artifact`, ids. A message the stages left untouched therefore goes back to a LangChain model as
    the very same object; only what a stage wrote is converted back."""

    def __init__(self, originals: Sequence[BaseMessage], converted: Sequence[dict[str, Any]]) -> None:
        self._by_form: dict[str, list[BaseMessage]] = {}
        if len(originals) == len(converted):  # one-to-one, so each form names its message
            pairs = list(zip(converted, originals, strict=True))
        else:
            # A message became several (a HumanMessage's tool_result blocks): the others are still one-to-one,
            # and keep their own objects (a system prompt's cache_control, a turn's signed thinking blocks).
            groups = _converted_groups(originals)
            if [m for _, group in groups for m in group] != list(converted):
                return
            pairs = [(group[0], original) for original, group in groups if len(group) == 1]
        for form, original in pairs:
            self._by_form.setdefault(_form(form), []).append(original)

    def restore(self, messages: Sequence[dict[str, Any]]) -> list[BaseMessage]:
        used: dict[str, int] = {}
        out: list[BaseMessage] = []
        for message in messages:
            key = _form(message)
            candidates, n = self._by_form.get(key, []), used.get(key, 0)
            if n < len(candidates):  # untouched by the stages: the caller's own object
                out.append(candidates[n])
                used[key] = n + 1
            else:
                out.extend(from_openai_messages([message]))
        return out


def _form(message: dict[str, Any]) -> str:
    return json.dumps(message, sort_keys=True, default=str)


def langchain_messages(request: Any) -> list[BaseMessage]:
    """The LangChain messages for a request's OpenAI messages: the app's own objects where untouched."""
    originals = request.metadata.get(ORIGINALS_KEY)
    if isinstance(originals, OriginalMessages):
        return originals.restore(request.messages)
    return from_openai_messages(request.messages)


def _without_none_content(message: dict[str, Any]) -> dict[str, Any]:
    # LangChain's converter wants a string where OpenAI allows null content beside tool calls.
    return {**message, "content": ""} if message.get("content") is None else message


def to_openai_tools(tools: Sequence[Any], *, strict: bool | None = None) -> list[dict[str, Any]]:
    """Tools in any form LangChain accepts (BaseTool, function, pydantic model, schema dict) as OpenAI schemas."""
    return [convert_to_openai_tool(tool, strict=strict) for tool in tools]


def to_openai_tool_choice(tool_choice: Any) -> Any:
    """LangChain's tool_choice ("any", True, a tool name) in OpenAI's spelling."""
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "tool" and "name" in tool_choice:
        return {"type": "function", "function": {"name": tool_choice["name"]}}  # Anthropic's spelling
    if tool_choice is None or isinstance(tool_choice, dict):
        return tool_choice
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    if tool_choice is False:
        return "none"
    if tool_choice in ("auto", "none"):
        return tool_choice
    if isinstance(tool_choice, str):
        return {"type": "function", "function": {"name": tool_choice}}
    return tool_choice


def to_langchain_tool_choice(tool_choice: Any, tools: Sequence[dict[str, Any]] = ()) -> Any:
    """An OpenAI tool_choice in LangChain's own spelling ("any", a tool name, "auto", "none"): ChatAnthropic
    read "required" as a tool of that name and sent OpenAI's dict to Anthropic as it was. With one tool,
    "required" is that tool's name, which every bind_tools takes (ChatHuggingFace reads "any" as a tool name,
    and takes a tool_choice only with one tool)."""
    if tool_choice == "required":
        if len(tools) == 1:
            name = ((tools[0] or {}).get("function") or {}).get("name")
            if isinstance(name, str) and name:
                return name
        return "any"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if isinstance(name, str) and name:
            return name
    return tool_choice


def usage_metadata(usage: Usage, *, from_cache: bool = False) -> UsageMetadata:
    """An answer's usage as LangChain reports it; one from ctxkit's cache keeps its tokens and costs 0, as
    LangChain marks a hit of its own cache (`total_cost: 0`), so cost trackers do not bill it again."""
    metadata = UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        input_token_details={"cache_read": usage.cached_tokens},
        output_token_details={},
    )
    if from_cache:
        metadata["total_cost"] = 0  # type: ignore[typeddict-unknown-key]
    return metadata


def _tool_calls(calls: Sequence[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    valid, invalid = [], []
    for call in calls:
        function = call.get("function") or {}
        raw = function.get("arguments") or "{}"
        try:
            args = json.loads(raw)
        except json.JSONDecodeError as exc:
            invalid.append(invalid_tool_call(name=function.get("name"), args=raw, id=call.get("id"), error=str(exc)))
            continue
        if not isinstance(args, dict):
            invalid.append(invalid_tool_call(name=function.get("name"), args=raw, id=call.get("id"),
                                             error="arguments are not a JSON object"))
            continue
        valid.append(tool_call(name=function.get("name") or "", args=args, id=call.get("id")))
    return valid, invalid


def to_ai_message(response: ChatResponse) -> AIMessage:
    """A ctxkit answer as the AIMessage a LangChain chat model returns."""
    valid, invalid = _tool_calls(response.tool_calls)
    refusal = response.message.get("refusal")
    return AIMessage(
        content=response.content or "",
        # where ChatOpenAI puts a refusal: its structured-output parsers raise OpenAIRefusalError from it
        additional_kwargs={"refusal": refusal} if refusal else {},
        tool_calls=valid,
        invalid_tool_calls=invalid,
        # what the call cost: every backend call it made (a recovery re-ran the model), as the ledger counts
        usage_metadata=usage_metadata(response.call_usage or response.usage, from_cache=response.answered_by is not None),
        response_metadata={
            "finish_reason": response.finish_reason,
            "model_name": response.model,
            "ctxkit_backend": response.backend,
            "ctxkit_answered_by": response.answered_by,
            # as ChatOpenAI reports them (asked for with logprobs=True)
            **({"logprobs": response.logprobs} if response.logprobs is not None else {}),
        },
        id=response.id,
    )


def to_message_chunk(chunk: dict[str, Any], *, from_cache: bool = False) -> AIMessageChunk | None:
    """One OpenAI `chat.completion.chunk` as an AIMessageChunk; None for a chunk that carries nothing."""
    content = refusal = ""
    tool_chunks = []
    response_metadata: dict[str, Any] = {}
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        content += delta.get("content") or ""
        refusal += delta.get("refusal") or ""
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            tool_chunks.append(tool_call_chunk(
                name=function.get("name"), args=function.get("arguments"), id=call.get("id"),
                index=call.get("index", 0),
            ))
        if choice.get("finish_reason"):
            response_metadata["finish_reason"] = choice["finish_reason"]
        if choice.get("logprobs"):  # merged over chunks as ChatOpenAI's are
            response_metadata["logprobs"] = choice["logprobs"]
    usage = None
    if chunk.get("usage"):
        u = chunk["usage"]
        details = u.get("prompt_tokens_details") or {}
        usage = usage_metadata(Usage(u["prompt_tokens"], u["completion_tokens"], details.get("cached_tokens") or 0),
                               from_cache=from_cache)
        response_metadata["model_name"] = chunk.get("model")
    if not content and not refusal and not tool_chunks and usage is None and not response_metadata:
        return None
    return AIMessageChunk(
        content=content, additional_kwargs={"refusal": refusal} if refusal else {}, tool_call_chunks=tool_chunks,
        usage_metadata=usage,
        response_metadata=response_metadata, id=chunk.get("id"),
    )


def ai_message_to_openai(message: AIMessage) -> dict[str, Any]:
    """An AIMessage (or a merged AIMessageChunk) as an OpenAI assistant message, invalid tool calls
    included: it is what the model answered."""
    return _with_invalid_calls(convert_to_openai_messages(message), message, answered=None)


def countable(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message in the form a TokenCounter counts: text content (a reasoning model's content
    blocks joined), tool calls as they are."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    text = "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return {**message, "content": text}


# Providers' own stop reasons (Anthropic's `stop_reason`, Gemini's and Bedrock's spellings) in OpenAI's terms,
# which ctxkit's stages read: a refusal or a safety block is `content_filter` (the cache never stores it), a
# cut-off answer `length`.
_FINISH_REASONS = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "complete": "stop",
    "length": "length", "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_calls": "tool_calls", "tool_use": "tool_calls", "function_call": "tool_calls",
    "content_filter": "content_filter", "refusal": "content_filter", "safety": "content_filter",
    "recitation": "content_filter", "blocklist": "content_filter", "prohibited_content": "content_filter",
    "spii": "content_filter", "image_safety": "content_filter", "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter", "error": "error", "malformed_function_call": "error",
}


def finish_reason(message: AIMessage) -> str:
    """Why a LangChain model stopped, in OpenAI's terms (`finish_reason`, else Anthropic's `stop_reason`,
    Bedrock's `stopReason`); an unknown reason is kept as it came. A message with tool calls that says it
    just stopped (Gemini's STOP) stopped to call them."""
    reason = _reported_finish(message.response_metadata)
    if message.tool_calls and reason in (None, "stop"):
        return "tool_calls"
    return reason or "stop"


def _reported_finish(metadata: dict[str, Any] | None) -> str | None:
    metadata = metadata or {}
    reason = metadata.get("finish_reason") or metadata.get("stop_reason") or metadata.get("stopReason")
    if not reason:
        return None
    reason = str(getattr(reason, "name", reason))  # Gemini's FinishReason enum
    return _FINISH_REASONS.get(reason.lower(), reason)


def usage_from_ai_message(message: AIMessage) -> Usage | None:
    """The usage a LangChain model reported on its message, or None when it reported none."""
    usage = message.usage_metadata
    if not usage:
        return None
    details = usage.get("input_token_details") or {}
    return Usage(usage["input_tokens"], usage["output_tokens"], details.get("cache_read") or 0)


def openai_chunks_from_message_chunk(
    chunk: AIMessageChunk, *, chunk_id: str, model: str, created: int
) -> list[dict[str, Any]]:
    """A LangChain AIMessageChunk as OpenAI `chat.completion.chunk` dicts (usage goes in its own chunk)."""
    base = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
    delta: dict[str, Any] = {}
    text = chunk.text if isinstance(chunk.content, list) else chunk.content
    if text:
        delta["content"] = text
    if chunk.tool_call_chunks:
        delta["tool_calls"] = [
            {"index": tc.get("index") or 0, "id": tc.get("id"), "type": "function",
             "function": {"name": tc.get("name") or "", "arguments": tc.get("args") or ""}}
            for tc in chunk.tool_call_chunks
        ]
    finish = _reported_finish(chunk.response_metadata)
    out = []
    if delta or finish:
        out.append({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    return out
