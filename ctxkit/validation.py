"""Checks a request before any backend sees it; every error names the message index or field at fault."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import jsonschema

from .errors import InvalidMessageError, InvalidToolError, RequestError
from .lru import memoized_by_digest
from .request import SAMPLING_PARAMS, ChatRequest

ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
CONTENT_PART_TYPES = {"text", "image_url", "input_audio", "file", "refusal"}


def validate_request(request: ChatRequest) -> None:
    """Raise a RequestError subclass for the first thing wrong with `request`; return None when it is sound."""
    if not isinstance(request.messages, (list, tuple)) or not request.messages:
        raise RequestError("must be a non-empty list of messages", "messages")
    # First: every check after this one, and the copies the pipeline makes, walk values recursively. (Tools'
    # parameters are checked with their schema, remembered: a catalog of 1,500 tools is sent on every call.)
    for where, value in (("messages", request.messages), ("params", request.params),
                         ("metadata", request.metadata)):
        check_nesting(value, where)
    _validate_messages(request.messages)
    _validate_tools(request.tools)
    tool_extras = _tool_extras(request.tools)
    check_nesting(tool_extras, "tools")
    _validate_params(request.params)
    _validate_tool_choice(request)
    _validate_fields(request)
    # Content and tool schemas are checked above with their own messages; any other string the backend gets (a
    # stop sequence, a message's name, a tool_call_id, `user`, a response_format schema, a document in the
    # metadata) failed its UTF-8 encode deep in the backend: a 500 from `ctxkit serve` over an upstream, a 502
    # over the local model.
    # The namespace too: it is hashed (UTF-8) into the call's prompt keys, a UnicodeEncodeError out of the call.
    fields: tuple[tuple[str, Any], ...] = (
        ("model", request.model), ("namespace", request.namespace), ("messages", request.messages),
        ("tools", tool_extras), ("params", request.params), ("metadata", request.metadata))
    for where, value in fields:
        found = lone_surrogate_at(value, "" if where == "params" else where)
        if found is not None:
            raise RequestError(_SURROGATE, found)


# What _validate_tools checks, level by level: a "description" beside "function" (not in it) is checked by no one
_CHECKED_TOOL_KEYS = frozenset({"type", "function"})
_CHECKED_FUNCTION_KEYS = frozenset({"name", "description", "parameters"})


def _tool_extras(tools: Any) -> list[Any]:
    """Each tool's fields that _validate_tools does not check ("strict", another SDK's), where they are, for the
    walks over them: the cache hashes them and the backend gets them. Only these: a catalog of 1,500 tools is
    sent on every call."""
    extras: list[Any] = []
    for tool in tools:  # most tools have none: None in their place (an error's path is tools[i] of the request)
        if tool.keys() - _CHECKED_TOOL_KEYS or tool["function"].keys() - _CHECKED_FUNCTION_KEYS:
            extras.append({**{k: v for k, v in tool.items() if k not in _CHECKED_TOOL_KEYS},
                           "function": {k: v for k, v in tool["function"].items()
                                        if k not in _CHECKED_FUNCTION_KEYS}})
        else:
            extras.append(None)
    return extras


def _validate_tool_choice(request: ChatRequest) -> None:
    choice = request.params.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required") or request.named_tool is not None:
        return
    raise RequestError('must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}, '
                       f"got {choice!r}", "tool_choice")


def check_tool_choice_offered(request: ChatRequest) -> None:
    """A tool_choice that names a tool must name one the request sends. Checked on what goes to the backend,
    not on what the app sent: a stage may add the tool (a catalog registered with the tool stage)."""
    name = request.named_tool
    if name is not None and name not in request.tool_names:
        raise RequestError(f"names {name!r}, which is not among the tools sent", "tool_choice")


MAX_KEY_CHARS = 256  # a namespace's or conversation_id's length (up to 1 KB of UTF-8)


def _validate_fields(request: ChatRequest) -> None:
    # The ledger records it and prices it by name: an int reached PriceTable.price as an AttributeError,
    # which replaced the call's own error and lost its ledger record.
    if request.model is not None and not isinstance(request.model, str):
        raise RequestError(f"must be a string, got {type(request.model).__name__}", "model")
    # Stages key their state on these (a summary per conversation, cache entries per namespace).
    if not isinstance(request.namespace, str) or not request.namespace:
        raise RequestError(f"must be a non-empty string, got {request.namespace!r}", "namespace")
    conversation = request.conversation_id
    if conversation is not None and (not isinstance(conversation, str) or not conversation):
        raise RequestError(f"must be a non-empty string or null, got {conversation!r}", "conversation_id")
    for where, key in (("namespace", request.namespace), ("conversation_id", conversation)):
        if key is not None and len(key) > MAX_KEY_CHARS:
            # PostgreSQL indexes them: a key past its index row size (~2.7 KB) failed every write of the call,
            # and a quarantine kept for a later write held the shared registry offline for good.
            raise RequestError(f"must be at most {MAX_KEY_CHARS} characters, got {len(key)}", where)
    if not isinstance(request.metadata, Mapping):
        raise RequestError(f"must be an object, got {type(request.metadata).__name__}", "metadata")
    for key in ("ctxkit.quarantined", "ctxkit.quarantined_documents"):
        # The quarantine stage's marks ({fingerprint or document id: reason}); an app or a proxy client can send
        # them too (OpenAI's `metadata`), and a number there was a TypeError in the cache stage: a 500.
        marks = request.metadata.get(key)
        if marks is not None and not (isinstance(marks, Mapping)
                                      and all(isinstance(k, str) and isinstance(v, str) for k, v in marks.items())):
            raise RequestError(f"must be an object of id -> reason strings, got {marks!r:.60}", f'metadata["{key}"]')
    timeout = request.timeout
    if timeout is not None and not _is_httpx_timeout(timeout) and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf):
        raise RequestError(f"must be a positive number of seconds (or an httpx.Timeout), got {timeout!r}", "timeout")
    headers = request.extra_headers
    # openai.Omit() as a value takes a header the client would send out of the request, as in openai
    if not isinstance(headers, Mapping) or not all(isinstance(k, str) and (isinstance(v, str) or _is_omit(v))
                                                   for k, v in headers.items()):
        # the values are not echoed: a header is where an API key goes
        raise RequestError("must be an object of header name -> string value", "extra_headers")
    for name, value in headers.items():
        if isinstance(value, str) and not sendable_header_value(value):
            # HTTP cannot carry it: the call failed as a retried "Connection error." (its cause, which quotes the
            # value, hidden) and httpcore's DEBUG log printed the value. Named, not echoed.
            raise RequestError("holds a line break, a control character, a character outside ASCII or spaces at "
                               "its ends, which no HTTP header can carry", f"extra_headers[{name!r}]")
    if not isinstance(request.extra_query, Mapping):
        raise RequestError(f"must be an object, got {type(request.extra_query).__name__}", "extra_query")


def sendable_header_value(value: str) -> bool:
    """Whether an HTTP client can send `value` as a header value: printable ASCII (httpx encodes header values as
    ASCII; h11 refuses control characters), tabs and spaces inside but none at its ends."""
    return value == value.strip(" \t") and all(c == "\t" or " " <= c <= "\x7f" for c in value)


def _is_omit(value: Any) -> bool:
    import openai

    omit = getattr(openai, "Omit", None)
    return omit is not None and isinstance(value, omit)


def _is_httpx_timeout(value: Any) -> bool:
    import httpx

    return isinstance(value, httpx.Timeout)


def _validate_messages(messages: Any) -> None:
    open_calls: dict[str, int] = {}  # tool_call_id -> index of the assistant message that made it
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidMessageError(f"must be an object, got {type(message).__name__}", i)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidMessageError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", i, "role")
        content = message.get("content")
        if "content" not in message and role != "assistant":
            # {"role": "user", "text": ...} said "content: must be a string ..., got NoneType": name the key it lacks
            # and the ones it has instead.
            others = ", ".join(repr(k) for k in message if k not in ("role", "content"))
            raise InvalidMessageError(f"is missing: a {role} message needs content"
                                      + (f" (its other keys: {others})" if others else ""), i, "content")
        if open_calls and role != "tool":
            # Providers reject a tool call whose results do not follow it (before the next turn).
            unanswered = ", ".join(repr(c) for c in open_calls)
            raise InvalidMessageError(f"tool call(s) {unanswered} of message {min(open_calls.values())} got no "
                                      "tool result before this message", i, "role")
        if role != "assistant" and message.get("tool_calls") not in (None, []):
            # read as calls by what follows (`"tool_calls": true` on a user message was a TypeError, a 500)
            raise InvalidMessageError(f"only an assistant message makes tool calls, not a {role} message",
                                      i, "tool_calls")
        if role == "assistant":
            tool_calls = message.get("tool_calls") or []
            if content is None and not tool_calls:
                raise InvalidMessageError("an assistant message needs content or tool_calls", i, "content")
            if content is not None:
                _check_content(content, i, allow_parts=True)
            for call_id in _check_tool_calls(tool_calls, i):
                open_calls[call_id] = i
        elif role == "tool":
            answered = message.get("tool_call_id")
            if not isinstance(answered, str) or not answered:
                raise InvalidMessageError("a tool message needs a tool_call_id string", i, "tool_call_id")
            if answered not in open_calls:
                raise InvalidMessageError(
                    f"tool_call_id {answered!r} answers no earlier assistant tool call", i, "tool_call_id"
                )
            del open_calls[answered]
            _check_content(content, i, allow_parts=True)
        else:
            # OpenAI takes text parts from a developer message as from a system one (the Agents SDK sends them)
            _check_content(content, i, allow_parts=role in ("user", "system", "developer"))
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidMessageError(f"must be a string, got {type(name).__name__}", i, "name")


def _check_content(content: Any, index: int, *, allow_parts: bool) -> None:
    if isinstance(content, str):
        _check_unicode(content, index, "content")
        return
    if isinstance(content, list) and allow_parts:
        for k, part in enumerate(content):
            # a type that is no string ({} or [] in a JSON body) is unhashable: a TypeError from the set lookup
            if not isinstance(part, dict) or not isinstance(part.get("type"), str) \
                    or part["type"] not in CONTENT_PART_TYPES:
                raise InvalidMessageError(
                    "must be a content part with a known type", index, f"content[{k}]"
                )
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise InvalidMessageError("text must be a string", index, f"content[{k}].text")
            if part["type"] == "text":
                _check_unicode(part["text"], index, f"content[{k}].text")
        return
    expected = "a string or a list of content parts" if allow_parts else "a string"
    raise InvalidMessageError(f"must be {expected}, got {type(content).__name__}", index, "content")


_SURROGATE = "holds a lone surrogate, which is not valid Unicode"

# Far deeper than any message, tool schema or parameter needs (OpenAI's strict schemas stop at 10 levels). Past
# it, the recursive walks a request goes through (copy.deepcopy, the surrogate check, the JSON Schema check) ran
# out of stack: a RecursionError, a 500 from `ctxkit serve`, for a body its JSON parser had taken.
MAX_NESTING = 64


def check_nesting(value: Any, path: str, limit: int = MAX_NESTING) -> None:
    """RequestError naming the first list or object in `value` nested more than `limit` deep (a list that holds
    itself is one). Iterative, so the check cannot itself run out of stack."""
    stack: list[tuple[Any, int, Any, Any]] = [(value, 0, None, None)]  # (item, depth, parent entry, key in it)
    while stack:
        entry = stack.pop()
        item, depth = entry[0], entry[1]
        if isinstance(item, Mapping):
            children: Any = item.items()
        elif isinstance(item, (list, tuple)):
            children = enumerate(item)
        else:
            continue
        if depth >= limit:
            raise RequestError(f"is nested more than {limit} lists or objects deep", _path_of(entry, path))
        stack.extend((child, depth + 1, entry, key) for key, child in children
                     if isinstance(child, (Mapping, list, tuple)))  # a string or a number nests nothing


def _path_of(entry: tuple[Any, int, Any, Any], root: str, shown: int = 6) -> str:
    """The path of `entry`, its first `shown` steps and then "...": the whole of it would be 64 steps long."""
    keys = []
    while entry[2] is not None:
        keys.append(entry[3])
        entry = entry[2]
    steps = [f"[{k}]" if isinstance(k, int) else f".{k}" for k in reversed(keys)]
    return root + "".join(steps[:shown]) + ("..." if len(steps) > shown else "")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lone_surrogate_at(value: Any, path: str) -> str | None:
    """The path of the first string (a value or a key) in `value` that is not valid Unicode; None if there is none."""
    if isinstance(value, str):
        return None if _is_unicode(value) else (path or "params")
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _is_unicode(key):
                return path or "params"
            found = lone_surrogate_at(item, where)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            found = lone_surrogate_at(item, f"{path}[{k}]")
            if found is not None:
                return found
    return None


def _check_unicode(text: str, index: int, field: str) -> None:
    """A lone surrogate ("\\ud800" in a JSON body) is no Unicode text: the tokenizer's UTF-8 encode failed deep in
    the backend (a 500 from `ctxkit serve`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessageError(f"holds a lone surrogate {text[exc.start]!r} at {exc.start}, which is not valid "
                                  "Unicode", index, field) from None


def _check_tool_calls(tool_calls: Any, index: int) -> list[str]:
    if not isinstance(tool_calls, list):
        raise InvalidMessageError("must be a list", index, "tool_calls")
    ids = []
    for k, call in enumerate(tool_calls):
        field = f"tool_calls[{k}]"
        if not isinstance(call, dict) or not isinstance(call.get("id"), str):
            raise InvalidMessageError("needs a string id", index, f"{field}.id")
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidMessageError("needs function.name", index, f"{field}.function.name")
        if not isinstance(function.get("arguments"), str):
            raise InvalidMessageError("must be a JSON string", index, f"{field}.function.arguments")
        _check_unicode(function["name"], index, f"{field}.function.name")
        _check_unicode(function["arguments"], index, f"{field}.function.arguments")
        # Arguments that are not a JSON object are accepted: a model wrote them, the app replays them with
        # the tool's error, and replace_malformed_arguments makes them sendable.
        ids.append(call["id"])
    return ids


def replace_malformed_arguments(request: ChatRequest) -> tuple[ChatRequest, list[str]]:
    """The request with every tool call's arguments that are not a JSON object replaced by "{}", and the
    fields replaced.

    Models sometimes emit broken arguments ('{"city": "Oslo"'), and an agent replays that call with the
    tool's error message. vLLM, llama.cpp's server and ctxkit's own prompt rendering parse the arguments
    of past calls, so one broken call would fail every later turn of the conversation. The tool message
    still says what went wrong; the app's own message list is not changed."""
    replaced: list[str] = []
    messages = list(request.messages)
    for i, message in enumerate(messages):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not calls or all(_is_json_object(c["function"]["arguments"]) for c in calls):
            continue
        fixed = []
        for k, call in enumerate(calls):
            if not _is_json_object(call["function"]["arguments"]):
                replaced.append(f"messages[{i}].tool_calls[{k}].function.arguments")
                call = {**call, "function": {**call["function"], "arguments": "{}"}}
            fixed.append(call)
        messages[i] = {**message, "tool_calls": fixed}
    return (request.override(messages=messages), replaced) if replaced else (request, [])


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):  # RecursionError: '[[[[...' past the parser's own limit
        return False


def _validate_tools(tools: Any) -> None:
    if not isinstance(tools, (list, tuple)):
        raise RequestError("must be a list of tool schemas", "tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidToolError('must be {"type": "function", "function": {...}}', i, "type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidToolError("must be an object", i, "function")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidToolError(f"invalid tool name {name!r} (letters, digits, _ . -; at most 64)", i, "function.name")
        if name in seen:
            raise InvalidToolError(f"duplicate tool name {name!r}", i, "function.name")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidToolError("must be a string", i, "function.description")
        if description and not _is_unicode(description):
            raise InvalidToolError(_SURROGATE, i, "function.description")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidToolError("must be a JSON Schema object", i, "function.parameters")
        try:
            canonical = json.dumps(parameters, sort_keys=True)
        except (TypeError, ValueError):
            raise InvalidToolError("not a valid JSON Schema: not JSON", i, "function.parameters") from None
        except RecursionError:  # hundreds of levels deep
            raise InvalidToolError(f"is nested more than {MAX_NESTING} lists or objects deep", i,
                                   "function.parameters") from None
        problem = _schema_problem(canonical)
        if problem is not None:
            message, path = problem
            raise InvalidToolError(f"not a valid JSON Schema: {message}", i, f"function.parameters{path}")


# Verdicts by a digest of the schema: functools.lru_cache keyed by the canonical text kept the last 32,768
# schemas alive after the requests that sent them had ended (a proxy's per-user catalogs with long enums:
# 4,000 schemas of 20 KB held 80 MB; at the bound, 650 MB).
SCHEMA_VERDICTS = 32768


@memoized_by_digest(SCHEMA_VERDICTS)
def _schema_problem(canonical: str) -> tuple[str, str] | None:
    """check_schema of one tool's parameters, remembered: it costs milliseconds per schema, and a request that
    carries a catalog of 1,500 tools sends the same schemas on every call (seconds per call otherwise)."""
    return _check_schema(canonical)


def _check_schema(canonical: str) -> tuple[str, str] | None:
    schema = json.loads(canonical)
    try:
        check_nesting(schema, "")  # the JSON Schema check below recurses several calls per level
    except RequestError as exc:
        return f"is nested more than {MAX_NESTING} lists or objects deep", exc.where or ""
    if not _is_unicode(json.dumps(schema, ensure_ascii=False)):  # a description or enum value the prompt renders
        return _SURROGATE, ""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return exc.message, "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in exc.path)
    return None


# Sampling settings outside the OpenAI API that vLLM, llama.cpp's server and the local backend read, sent
# in `extra_body` (vLLM calls repeat_penalty repetition_penalty).
BACKEND_SAMPLING = frozenset({"top_k", "min_p", "typical_p", "repeat_penalty", "repetition_penalty", "tfs_z",
                              "mirostat_mode", "mirostat_tau", "mirostat_eta"})


def _validate_params(params: Any) -> None:
    if not isinstance(params, Mapping):
        raise RequestError(f"must be an object of sampling parameters, got {type(params).__name__}", "params")
    # A key no backend reads was ignored by the local model (`max_token` let it generate without a limit) and
    # reached the openai SDK as a TypeError: name it, as the OpenAI-style client does for create()'s arguments.
    unknown = sorted(str(key) for key in params if key not in SAMPLING_PARAMS and key != "extra_body")
    if unknown:
        hint = [k for k in unknown if k in BACKEND_SAMPLING]
        raise RequestError(f"unknown sampling parameter(s) {unknown}; expected some of {sorted(SAMPLING_PARAMS)}"
                           + (f" ({hint} go in params['extra_body'])" if hint else ""), "params")
    extra_body = params.get("extra_body")
    if extra_body is not None and not isinstance(extra_body, Mapping):
        raise RequestError(f"must be an object, got {type(extra_body).__name__}", "extra_body")
    for key in sorted(BACKEND_SAMPLING):  # numbers, or the backend fails deep inside
        value = (extra_body or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RequestError(f"must be a number, got {value!r}", key)
    temperature = params.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise RequestError(f"must be a number from 0 to 2, got {temperature!r}", "temperature")
    for key in ("max_tokens", "max_completion_tokens"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RequestError(f"must be a positive integer, got {value!r}", key)
    # The rest as the OpenAI API checks them: a backend handed a wrong type fails deep inside (llama.cpp's
    # ctypes raise TypeError), and that would reach the caller as a 502 from the backend, not a 400.
    for key, low, high in (("top_p", 0, 1), ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not low <= value <= high):
            raise RequestError(f"must be a number from {low} to {high}, got {value!r}", key)
    if params.get("n") not in (None, 1):  # one answer per call: a response holds one choice
        raise RequestError(f"only n=1 is supported, got {params.get('n')!r}", "n")
    for key in ("seed", "top_logprobs"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"must be an integer, got {value!r}", key)
    for key in ("reasoning_effort", "verbosity", "service_tier", "prompt_cache_key", "safety_identifier", "user"):
        value = params.get(key)
        if value is not None and not isinstance(value, str):
            raise RequestError(f"must be a string, got {value!r}", key)
    for key in ("logprobs", "parallel_tool_calls", "store"):
        value = params.get(key)
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"must be true or false, got {value!r}", key)
    stop = params.get("stop")
    if stop is not None and not isinstance(stop, str) and (
            not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"must be a string or a list of non-empty strings, got {stop!r}", "stop")
    logit_bias = params.get("logit_bias")
    if logit_bias is not None and not isinstance(logit_bias, Mapping):
        raise RequestError(f"must be an object of token id -> bias, got {type(logit_bias).__name__}", "logit_bias")
    response_format = params.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, Mapping) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise RequestError('must be {"type": "text" | "json_object" | "json_schema", ...}, '
                               f"got {response_format!r}", "response_format")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
                raise RequestError('needs {"name": ..., "schema": {...}}', "response_format.json_schema")
