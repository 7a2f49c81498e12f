"""ChatRequest: one call as it travels through the stages, in the OpenAI chat format as plain data.

A request is never changed in place: a stage that edits it makes a copy with `request.override(...)`,
so the pipeline can measure each stage's effect by comparing what went in with what came out.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

Message = dict[str, Any]
Tool = dict[str, Any]

# Sampling and decoding parameters that a backend receives; anything else the caller passes is metadata.
SAMPLING_PARAMS = frozenset(
    {
        "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
        "presence_penalty", "frequency_penalty", "tool_choice", "parallel_tool_calls",
        "response_format", "logprobs", "top_logprobs", "n", "logit_bias", "user",
    }
) | frozenset(
    # The OpenAI API's settings of a provider's service, not of decoding: an OpenAI-compatible backend gets
    # them, the local model has nothing they change (it stores nothing, has one tier, does not reason).
    {"reasoning_effort", "verbosity", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """What the application asked for.

    messages:        OpenAI chat messages (dicts with role, content, tool_calls, tool_call_id, name).
    tools:           OpenAI tool schemas `{"type": "function", "function": {...}}`.
    params:          sampling parameters passed to the backend (temperature, max_tokens, tool_choice, ...).
    model:           the model name asked for; None lets the backend use its own.
    stream:          whether the caller wants deltas as they come.
    namespace:       tenant/namespace; stages that keep state (caches, memory) never cross it.
    conversation_id: groups the calls of one conversation, for stages and for the ledger.
    metadata:        free-form data for stages; never sent to the backend.
    timeout:         seconds this call may take at the backend (the backend's own limit when None); past it,
                     BackendTimeoutError. The local model checks it while waiting for the model and between
                     generated tokens.
    extra_headers:   HTTP headers for an HTTP backend's request (OpenAIBackend), as the openai client's
                     `extra_headers`; never logged, cached or part of a cache key.
    extra_query:     query parameters for an HTTP backend's request, as the openai client's `extra_query`.
    """

    messages: Sequence[Message]
    tools: Sequence[Tool] = ()
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model: str | None = None
    stream: bool = False
    namespace: str = "default"
    conversation_id: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timeout: float | None = None
    extra_headers: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    extra_query: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def override(self, **changes: Any) -> ChatRequest:
        """A copy with some fields replaced (LangChain's `request.override`)."""
        return dataclasses.replace(self, **changes)

    @property
    def max_tokens(self) -> int | None:
        value = self.params.get("max_completion_tokens", self.params.get("max_tokens"))
        return int(value) if value is not None else None

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def transport_options(self) -> dict[str, Any]:
        """The per-call HTTP options that are set (`timeout`, `extra_headers`, `extra_query`), as the openai
        client and ChatOpenAI take them as call arguments."""
        options: dict[str, Any] = {}
        if self.timeout is not None:
            options["timeout"] = self.timeout
        if self.extra_headers:
            options["extra_headers"] = dict(self.extra_headers)
        if self.extra_query:
            options["extra_query"] = dict(self.extra_query)
        return options

    @property
    def named_tool(self) -> str | None:
        """The tool `tool_choice={"type": "function", "function": {"name": X}}` forces, X; None otherwise."""
        choice = self.params.get("tool_choice") if isinstance(self.params, Mapping) else None
        function = choice.get("function") if isinstance(choice, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None  # {"function": "x"}: no name
        return name if isinstance(name, str) else None

    @classmethod
    def from_openai_kwargs(cls, kwargs: Mapping[str, Any], **defaults: Any) -> ChatRequest:
        """Build a request from the keyword arguments of `chat.completions.create`.

        ctxkit's own fields can be passed through `extra_body={"ctxkit": {"namespace": ..., ...}}` or as
        `metadata`, so the OpenAI-style client keeps its exact signature.
        """
        from .errors import RequestError

        # openai's "not given" sentinels (`openai.omit`, `NOT_GIVEN`) mean the argument was left out, as the
        # openai client reads them: wrappers pass them for every setting their caller did not make.
        kwargs = {k: v for k, v in kwargs.items() if not _not_given(v)}
        ctx = dict(defaults)
        if kwargs.get("messages") is None:  # as openai's client: a missing argument is named, not a KeyError
            raise RequestError("is required", "messages")
        for key, kinds, wanted in (("messages", (list, tuple), "a list of messages"),
                                   ("tools", (list, tuple, type(None)), "a list of tool schemas"),
                                   ("extra_body", (Mapping, type(None)), "an object")):
            if not isinstance(kwargs.get(key), kinds):
                raise RequestError(f"must be {wanted}, got {type(kwargs[key]).__name__}", key)
        extra_body = dict(kwargs.pop("extra_body", None) or {})
        own = extra_body.pop("ctxkit", None) or {}
        fields = {f.name for f in dataclasses.fields(cls)} - {"messages", "tools", "params", "model", "stream",
                                                               *TRANSPORT_OPTIONS}
        if not isinstance(own, Mapping) or set(own) - fields:
            wrong = sorted(set(own) - fields) if isinstance(own, Mapping) else type(own).__name__
            raise RequestError(f"unknown ctxkit field(s) {wrong}; expected some of {', '.join(sorted(fields))}",
                               'extra_body["ctxkit"]')
        ctx.update(own)
        # As the openai client: a message may be the `ChatCompletionMessage` a completion returned (the
        # cookbook's `messages.append(response.choices[0].message)`), sent as its JSON.
        messages = [_as_json(m) for m in kwargs.pop("messages")]
        tools = kwargs.pop("tools", None) or ()
        model = kwargs.pop("model", None)
        stream = kwargs.pop("stream", None)
        if stream is not None and not isinstance(stream, bool):  # "false" is a true string
            raise RequestError(f"must be true or false, got {stream!r}", "stream")
        stream = bool(stream)
        stream_options = kwargs.pop("stream_options", None)  # ctxkit always asks backends for usage
        if stream_options is not None and not isinstance(stream_options, Mapping):
            raise RequestError(f"must be an object, got {type(stream_options).__name__}", "stream_options")
        include_usage = (stream_options or {}).get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):  # "false" would ask for the usage
            raise RequestError(f"must be true or false, got {include_usage!r}", "stream_options.include_usage")
        metadata: dict[str, Any] = {}
        for where, given in (("metadata", kwargs.pop("metadata", None)),
                             ('extra_body["ctxkit"].metadata', ctx.pop("metadata", None))):
            if given is not None and not isinstance(given, Mapping):
                raise RequestError(f"must be an object, got {type(given).__name__}", where)
            metadata.update(given or {})
        transport = {k: kwargs.pop(k) for k in TRANSPORT_OPTIONS if kwargs.get(k) is not None}
        params = {k: v for k, v in kwargs.items() if k in SAMPLING_PARAMS and v is not None}
        if extra_body:  # backend-specific sampling (top_k, min_p, ...): passed on, not dropped
            params["extra_body"] = extra_body
        unknown = sorted(k for k in kwargs if k not in SAMPLING_PARAMS and k not in TRANSPORT_OPTIONS)
        if unknown:
            # named in `param` as OpenAI names a bad field: the first unknown one, not the method's name
            raise RequestError(f"unsupported argument(s): {', '.join(unknown)}", unknown[0])
        copies = {}
        for where, value in (("messages", messages), ("tools", tools)):
            try:
                copies[where] = copy.deepcopy(list(value))
            except RecursionError:  # hundreds of levels deep: validation names anything past its own limit
                raise RequestError("is nested too deeply", where) from None
        return cls(
            messages=copies["messages"],
            tools=copies["tools"],
            params=params,
            model=model,
            stream=stream,
            metadata=metadata,
            **transport,
            **ctx,
        )


# The openai client's per-call options for its HTTP request, not fields of the API's body.
TRANSPORT_OPTIONS = ("timeout", "extra_headers", "extra_query")


def _as_json(message: Any) -> Any:
    """A pydantic model (openai's ChatCompletionMessage) as the dict the openai client would send; anything
    else as it is (validation names what is wrong with it)."""
    dump = getattr(message, "model_dump", None)
    if dump is None or isinstance(message, Mapping):
        return message
    return dump(mode="json", exclude_none=True)


def _not_given(value: Any) -> bool:
    import openai

    sentinels = tuple(t for t in (getattr(openai, "NotGiven", None), getattr(openai, "Omit", None)) if t is not None)
    return isinstance(value, sentinels)


def call_answered(messages: Sequence[Mapping[str, Any]], index: int) -> tuple[str, str] | None:
    """(function name, arguments JSON) of the call the tool result messages[index] answers: the newest call
    with its tool_call_id before it. Some providers number calls per response ("call_0" on every step), so
    the id alone can name a later call with other arguments. None when no call before it has that id."""
    call_id = messages[index].get("tool_call_id")
    for k in range(index - 1, -1, -1):  # not messages[:index][::-1]: two copies of the history per result
        for call in messages[k].get("tool_calls") or []:
            if call.get("id") == call_id:
                function = call.get("function") or {}
                return str(function.get("name", "tool")), str(function.get("arguments", "{}"))
    return None


def tool_calls_by_id(messages: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """{tool_call_id: (function name, arguments JSON)} of every assistant tool call in `messages`."""
    calls: dict[str, tuple[str, str]] = {}
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            calls[call.get("id", "")] = (function.get("name", "tool"), function.get("arguments", "{}"))
    return calls
