"""ToolRetrievalStage: send only the tool schemas a call needs, and recover when the model needs another.

    stage = ToolRetrievalStage(catalog=my_1500_tools, top_k=5, pinned=["search_docs"], compact=True)
    pipeline = Pipeline(backend, stages=[stage])
    pipeline.chat([{"role": "user", "content": "What's the weather in Oslo?"}])  # no tools= needed

The pool a call selects from is the request's own tools when it has any, otherwise the catalog
registered once at construction. Recovery, for whole (non-streamed) answers:

- "rerun": the model called a catalog tool that was not sent (a provider does not constrain names), or
  said it has no tool for this: the stage calls once more with that tool added (or with twice the
  tools), and the caller gets the second answer.
- "find_tools": a `find_tools(query)` meta-tool is offered; when the model calls it, the stage searches
  the catalog with the model's query and calls once more with the tools found.
- "both", or "off".

A call to a name in neither the catalog nor the meta-tool raises UnknownToolError. Every selection and
recovery is noted in the ledger (`record_event`); the token saving itself is measured by the pipeline.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..._aio import tracked_to_thread
from ...errors import ConfigurationError, UnknownToolError
from ...forking import renew_after_fork
from ...lru import LRUMemo
from ...pipeline import EventRecorder, event_recorder, record_event
from ...redaction import redact
from ...request import ChatRequest
from ...response import AsyncChatStream, ChatResponse, ChatStream, message_text
from ...settings import name_list, whole_number
from ...stage import AsyncCallNext, AsyncResult, CallNext, Result, Stage
from ...tokens import TokenCounter
from ..prefix import default_counter, previous_prompt_end, shared_prefix
from .compaction import compact_tool
from .index import DOCUMENT_MEMO_SIZE, FusionConfig, Tool, ToolIndex, VectorMemo, catalog_hash, tool_hash
from .selector import Selection, ToolSelector
from .text import ToolDocument

RECOVERY_MODES = ("off", "rerun", "find_tools", "both")
REMEMBERED_PROMPTS = 1024  # conversations whose last tool block (and prompt size) the stage remembers
FIND_TOOLS = "find_tools"
FIND_TOOLS_SCHEMA: Tool = {
    "type": "function",
    "function": {
        "name": FIND_TOOLS,
        "description": "Search the full tool catalog when none of the offered tools fits the task. "
                       "The tools found are offered on the next turn.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What the needed tool should do."}},
            "required": ["query"],
        },
    },
}
# "I don't have a tool for that", "there is no suitable function", "none of the provided tools can": the
# model says the selection missed. Only articles and a few adjectives may come between the denial and the
# word tool, so "No problem! I checked with the weather tool" and "no need to call any function" do not count;
# before "tool" (only), up to two words naming it ("a weather tool", "the get_weather tool", "a currency
# conversion tool"), but not a word that makes the phrase something else ("the same tool", "no need for tools").
_TOOL_NAMED = (r"(?:(?!(?:for|to|of|in|on|at|by|with|without|from|and|or|but|than|as|is|are|was|were|be|need|"
               r"needs|more|other|same|this|that|these|those|your|my|our|its|their|his|her|previous|last|first|"
               r"next|following|above|below|original|main|helper|recursive|built-in|builtin|anonymous|lambda|"
               r"inner|outer|nested|async|pure|what|which|whose|how|why|where|when|who|sorry|no|not)\b)[A-Za-z][\w.-]*\s+){0,2}")
_DETERMINERS = r"(?:(?:a|an|any|the|such|one|suitable|appropriate|relevant|available|specific|right|matching|" \
               r"dedicated|proper|necessary|required|provided|given|offered|existing)\s+){0,3}"
# Words naming it only before "tool": before "function" they name a function of a language or of the user's
# code ("JavaScript has no native function for deep cloning", "you can't use the map function on a dict",
# "I can't use an arrow function as a constructor"), not a tool missing from the selection.
_BEFORE_TOOL = _DETERMINERS + r"(?:" + _TOOL_NAMED + r"tools?|functions?)\b"
# After a bare "no" only: "no tool is needed" says none is missing, but "I don't have the tool required to
# check the weather" still says the selection missed.
_NOT_NEEDED = r"(?!\s*(?:calls?\s+)?(?:(?:is|are|was|were)\s+)?(?:needed|required|necessary|made|called|used))"
# "I can't use the function without your API key": the tool is there, something else is missing.
_NOT_CONDITIONAL = r"(?!\s+(?:[\w']+\s+){0,3}?(?:without|until|unless|before|because|since|due)\b)"
# "no tool errors", "no tool output was returned", "I don't have the tool results yet": "tool" names the kind
# of an output of tools that ran, not a missing tool.
_NOT_COMPOUND = (r"(?!\s+(?:errors?|outputs?|results?|responses?|calls?|failures?|issues?|problems?|data|"
                 r"messages?|logs?|runs?|executions?|invocations?|returns?|repl(?:y|ies)|warnings?|"
                 # "Python has no function overloading", "I don't have the tool descriptions": a property of
                 # functions, not a function.
                 r"overload(?:ing|s)?|signatures?|definitions?|declarations?|bod(?:y|ies)|names?|pointers?|"
                 r"arguments?|args|parameters?|params|types?|scopes?|docs|docstrings?|documentation|"
                 r"descriptions?|schemas?|decorators?|composition|hoisting|support|use|usage)\b)")
# "None of the tools can do this" says the selection missed; "none of the tools returned an error" reports
# on tools that ran: after "none of ... tools" only a verb of ability or fit (or the sentence's end) counts.
_NONE_CAN = (r"(?=(?:\s+(?:here|available|provided|offered|listed|above|(?:that\s+)?(?:i|we)\s+(?:have|was\s+given|"
             r"were\s+given)(?:\s+access\s+to)?|available\s+to\s+(?:me|us)|at\s+my\s+disposal))*"
             r"\s*(?:(?:(?:is|are)(?!\s+(?:currently\s+)?\w+ing\b)|can|could|will|would|fits?|match(?:es)?|supports?|handles?|allows?|lets?|does|do|"
             r"seems?|appears?|helps?|provides?|performs?|offers?|covers?)\b|[.,;:!?)]|$))")
# "I can't find the function parse_date in the code you shared", "I don't see the function you mean", "the
# function's source": a function of the user's code, named or pointed at, not a tool missing from the selection.
# Not "the tools you need", "a function get_weather available": those are tools missing from the selection.
_USERS_CODE = (r"(?:in|from|of)\s+(?:your|the|this|that)\s+"
               r"(?:code|snippet|file|message|script|program|class|module|example|question)s?\b")
_NOT_USERS = (r"(?!'s\b|\s*`|\s+(?:you(?:'re|'ve|\s+are|\s+have)?\s+(?:just\s+)?(?:referring|refer|mean|meant|shared|wrote|"
              r"written|posted|pasted|defined|describ\w*|talking|quoted|showed|shown|included|provided)\b"
              r"|" + _USERS_CODE +
              r"|[A-Za-z]\w*(?:_\w*|\(|(?-i:[a-z][A-Z]))(?!\S*\s+(?:(?:is|are)\s+)?(?:available|offered|here|among|"
              r"at\s+my\s+disposal|to\s+(?:call|use)|(?:tool|function)s?\b))))")
# After "I don't have / can't use": a named function is a tool missing from the selection ("I don't have the
# function get_weather in my toolset"), unless what follows points at the user's code.
_NOT_USERS_HAVE = (r"(?!'s\b|\s+(?:you(?:'re|'ve|\s+are|\s+have)?\s+(?:just\s+)?(?:referring|refer|mean|meant|shared|"
                   r"wrote|written|posted|pasted|defined|describ\w*|talking|quoted|showed|shown|included|provided)\b"
                   r"|" + _USERS_CODE + r"|\s*`?[A-Za-z]\w*(?:\(\)?)?`?(?:'s\b|\s+" + _USERS_CODE + r")))")
_SUBJECT_TOOLS = (r"(?:(?:(?:available|provided|offered|given|current)\s+)?tools|(?:available|provided|offered|given)\s+functions"
                  r"|functions\s+(?:available|provided|offered)(?:\s+to\s+(?:me|us))?)"
                  r"(?:\s+(?:here|available(?:\s+to\s+(?:me|us))?|provided|offered|listed|(?:that\s+)?(?:i|we)\s+"
                  r"(?:have|was\s+given|were\s+given)(?:\s+access\s+to)?))?")
_LACKS_TOOL = re.compile(
    r"\b(?:(?:do not|don't|does not|doesn't|cannot|can't|unable to)\s+(?:find|see)(?:\s+access\s+to)?\s+"
    + _BEFORE_TOOL + _NOT_USERS + _NOT_COMPOUND + _NOT_CONDITIONAL
    + r"|(?:do not|don't|does not|doesn't|cannot|can't|unable to)\s+(?:have|use)(?:\s+access\s+to)?\s+"
    + _BEFORE_TOOL + _NOT_USERS_HAVE + _NOT_COMPOUND + _NOT_CONDITIONAL
    + r"|(?:not|never)\s+(?:been\s+)?(?:given|provided)(?:\s+with)?\s+" + _BEFORE_TOOL
    + r"|none\s+of\s+(?:my\s+|our\s+)?" + _BEFORE_TOOL + _NONE_CAN
    # "The available tools do not support currency conversion", "the tools I have can't do that": the selection,
    # named first, said to fall short. Bare "functions" only with a word that makes them the offered ones.
    + r"|\b(?:the|my|our)\s+" + _SUBJECT_TOOLS
    + r"\s+(?:do\s+not|don't|does\s+not|doesn't|cannot|can't|can\s+not|are\s+not\s+able\s+to|won't)\s+"
    + r"(?:support|handle|include|cover|do|offer|provide|perform|allow|help|convert|match|fit)\b"
    + r"(?!\s+(?:any\s+|the\s+|a\s+)?(?:results?|data|outputs?|errors?|responses?|information|info|values?)\b)" + _NOT_CONDITIONAL
    # "There isn't a tool here that converts currencies" (tools only: "there isn't a function in Python").
    + r"|there\s+(?:isn't|is\s+not|aren't|are\s+not)\s+" + _DETERMINERS + r"tools?\b" + _NOT_COMPOUND + _NOT_NEEDED
    + r"|no\s+" + _BEFORE_TOOL + _NOT_USERS + _NOT_COMPOUND + _NOT_NEEDED + r")",
    re.IGNORECASE,
)

# "Python has no function named flatten", "there is no tool in Photoshop for that", "no function in the standard
# library does that": a language, product or library lacks it, not the selection. A proper noun (not I / We /
# You) that "has no" it, or one the tool is "in", names whose it is.
_OTHERS_HAVE_NO = re.compile(r"(?:^|[^\w'])(?!(?:I|We|You)\b)[A-Z][\w+#.-]*\s+(?:has|had|have|offers|provides|"
                             r"includes|ships\s+with)\s+$")
_IN_OTHERS = re.compile(r"\s+(?:in|within|from)\s+(?:(?:the|its)\s+)?(?:(?!I\b)[A-Z]|standard\s+librar|stdlib\b|"
                        r"built-?ins?\b|core\s+librar)")


def _lacks_tool(text: str) -> bool:
    """The answer says the selection has no tool for the task (see _LACKS_TOOL), not that something else does."""
    for match in _LACKS_TOOL.finditer(text):
        if re.match(r"no\s", match.group(0), re.IGNORECASE):
            if _OTHERS_HAVE_NO.search(text[max(0, match.start() - 80):match.start()]):
                continue
            if _IN_OTHERS.match(text, match.end()):
                continue
        return True
    return False


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One call's selection: the request passed on, and what recovery needs to know."""

    request: ChatRequest
    index: ToolIndex
    selector: ToolSelector
    sent: frozenset[str]
    offered_find_tools: bool
    searched: bool = False  # the re-run after a find_tools search
    key: str = ""  # what the block it sends is remembered by (_sent_key): hashed once per call


class ToolRetrievalStage(Stage):
    """Selects the top-k tools for each call from the request's tools or a registered catalog."""

    name = "tool_retrieval"

    def __init__(
        self,
        catalog: Sequence[Tool] | None = None,
        top_k: int = 5,
        pinned: Sequence[str] = (),
        compact: bool = False,
        recovery: str = "rerun",
        *,
        embedder: Any = None,
        index_dir: str | Path | None = None,
        fusion: FusionConfig | None = None,
        keep_used: bool = True,
        max_indexes: int = 8,
        counter: TokenCounter | None = None,
    ) -> None:
        """catalog:   tools registered once; None selects from each request's own tools.
        top_k:       tools chosen by retrieval per call (pinned and already-used tools come on top).
        pinned:      tool names always sent.
        compact:     send compacted schemas (same validation, fewer tokens; see compaction.py).
        recovery:    "rerun", "find_tools", "both" or "off" (see the module docstring).
        embedder:    a shared `ctxkit.embed.Embedder`; None loads MiniLM on first use.
        index_dir:   where indexes persist across processes; None keeps them in memory.
        max_indexes: distinct request-tool pools kept indexed (each built once per process).
        counter:     the backend's TokenCounter, for the prefix tokens a changed selection un-caches."""
        top_k = whole_number(top_k, "top_k", minimum=1)
        max_indexes = whole_number(max_indexes, "max_indexes", minimum=1)
        if recovery not in RECOVERY_MODES:
            raise ConfigurationError(f"recovery must be one of {', '.join(RECOVERY_MODES)}, got {recovery!r}")
        pinned = name_list(pinned, "pinned")
        if catalog is not None:
            from ...validation import validate_request

            catalog = copy.deepcopy(list(catalog))  # its hash is taken once: later edits to the caller's dicts
            validate_request(ChatRequest(messages=[{"role": "user", "content": "-"}], tools=catalog))
            names = {t["function"]["name"] for t in catalog}
            absent = [n for n in pinned if n not in names]
            if absent:  # "always sent" must not quietly mean "never sent"
                raise ConfigurationError(f"pinned tool(s) {absent} are not in the catalog")
        self.catalog = catalog
        # Hashing a pool is O(catalog) JSON dumps (~25 ms for 1,500 tools, 200 ms for 10k): once, not per call.
        self._catalog_key = catalog_hash(catalog) if catalog is not None else None
        self.top_k = top_k
        self.pinned = tuple(pinned)
        self.compact = compact
        self.recovery = recovery
        self.index_dir = index_dir
        self.fusion = fusion
        self.keep_used = keep_used
        self.max_indexes = max_indexes
        self._embedder = embedder
        self._indexes: collections.OrderedDict[str, ToolIndex] = collections.OrderedDict()
        self._compacted: dict[str, Tool] = {}
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        renew_after_fork(self, ToolRetrievalStage._after_fork_in_child)
        self._vectors = VectorMemo()  # each schema embedded once for all the pools this stage sees
        self._documents: LRUMemo[str, ToolDocument] = LRUMemo(DOCUMENT_MEMO_SIZE)  # and split and stemmed once
        # What the last backend call for a prompt (its messages) was sent, recovery re-runs and a forced
        # tool_choice included: the next call of that conversation compares its tool block with it.
        self._sent_for: LRUMemo[str, list[Tool]] = LRUMemo(REMEMBERED_PROMPTS)
        # and the prompt tokens the backend reported for it: the prompt as later stages sent it (documents
        # rendered, duplicates collapsed), which is what a prefix cache held, not the messages this stage saw.
        self._prompt_for: LRUMemo[str, int] = LRUMemo(REMEMBERED_PROMPTS)
        # The last prompt the backend reported per conversation: the most a changed tool block can un-cache when
        # the previous call's messages reached this stage in another form (an earlier stage rewrote them since).
        self._last_prompt: LRUMemo[tuple[str, str], int] = LRUMemo(REMEMBERED_PROMPTS)
        # The tool block the last backend call per conversation was sent: when the pool changed since (a tool's
        # schema edited under the same name, tools reordered), the previous call's block is not found by _sent_key,
        # which names the pool, yet that block is what the backend's prefix cache holds.
        self._last_block: LRUMemo[tuple[str, str], list[Tool]] = LRUMemo(REMEMBERED_PROMPTS)
        self.counter = counter if counter is not None else default_counter()

    def _after_fork_in_child(self) -> None:
        """In a forked child (gunicorn --preload, multiprocessing's fork): a build of the parent's held its pool's
        lock while it embedded the tools (seconds), held for ever here, so the child's first call with that pool
        hung; the child builds what the parent had not finished."""
        self._lock = threading.Lock()
        self._building = {}

    # -- the index ----------------------------------------------------------------------------------
    def index_for(self, tools: Sequence[Tool]) -> ToolIndex:
        """The index of a pool of tools, built on first use and then reused (or loaded from index_dir)."""
        key = self._catalog_key if tools is self.catalog and self._catalog_key else catalog_hash(tools)
        with self._lock:
            index = self._indexes.get(key)
            if index is not None:
                self._indexes.move_to_end(key)
                return index
            if self._embedder is None:
                from ...embed import Embedder

                self._embedder = Embedder()
            building = self._building.setdefault(key, threading.Lock())
        # Built outside the stage's lock (embedding a new pool takes seconds): calls for pools already
        # indexed go on meanwhile; a second call for this pool waits for this build instead of repeating it.
        with building:
            with self._lock:
                index = self._indexes.get(key)
            if index is None:
                try:
                    # Only the registered catalog's index is saved whole: a request's pool may differ on every
                    # call, and each would leave a full copy of its vectors (which the store keeps per tool).
                    index = ToolIndex(tools, self._embedder, directory=self.index_dir, fusion=self.fusion,
                                      vector_memo=self._vectors, save_index=tools is self.catalog,
                                      document_memo=self._documents)
                except BaseException:
                    with self._lock:
                        self._building.pop(key, None)  # the next call tries again
                    raise
                with self._lock:
                    self._indexes[key] = index
                    self._building.pop(key, None)
                    while len(self._indexes) > self.max_indexes:
                        self._indexes.popitem(last=False)
            return index

    # -- the hooks ----------------------------------------------------------------------------------
    def naive_request(self, request: ChatRequest) -> ChatRequest:
        """Without this stage a registered catalog would have been sent whole: that is what it saves."""
        return request.override(tools=self.catalog) if self.catalog and not request.tools else request

    def wrap_call(self, request: ChatRequest, call_next: CallNext) -> Result:
        plan = self._plan(request)
        if plan is None:
            return call_next(request)
        self._remember_sent(plan)
        result = call_next(plan.request)
        self._remember_prompt(plan, result)
        if isinstance(result, ChatStream):
            return self._checked_stream(plan, result)  # chunks go out as they come: checked, not recovered
        if not isinstance(result, ChatResponse):
            return result
        retry = self._recovery(request, plan, result)
        if retry is None:
            return result
        self._remember_sent(retry)
        second = call_next(retry.request)
        self._remember_prompt(retry, second)
        if isinstance(second, ChatResponse):
            self._check_second(retry, second)
        return second

    async def awrap_call(self, request: ChatRequest, call_next: AsyncCallNext) -> AsyncResult:
        # Selection embeds the query (and the first call builds the index): CPU work, off the event loop.
        plan = await tracked_to_thread(self._plan, request)
        if plan is None:
            return await call_next(request)
        self._remember_sent(plan)
        result = await call_next(plan.request)
        self._remember_prompt(plan, result)
        if isinstance(result, AsyncChatStream):
            return self._achecked_stream(plan, result)
        if not isinstance(result, ChatResponse):
            return result
        retry = await tracked_to_thread(self._recovery, request, plan, result)
        if retry is None:
            return result
        self._remember_sent(retry)
        second = await call_next(retry.request)
        self._remember_prompt(retry, second)
        if isinstance(second, ChatResponse):
            self._check_second(retry, second)
        return second

    # -- selection ----------------------------------------------------------------------------------
    def _pool(self, request: ChatRequest) -> list[Tool] | None:
        if request.tools:
            return list(request.tools)
        return self.catalog

    def _plan(self, request: ChatRequest, *, top_k: int | None = None, extra: Sequence[str] = (),
              offer_find_tools: bool | None = None) -> _Plan | None:
        pool = self._pool(request)
        if not pool:
            return None
        index = self.index_for(pool)
        selector = ToolSelector(index, top_k=self.top_k, pinned=self.pinned, keep_used=self.keep_used)
        k = top_k or self.top_k
        named = [request.named_tool] if request.named_tool else []
        if len(pool) <= k:
            names = [t["function"]["name"] for t in pool]
            selection = Selection(tuple(pool), tuple(names), (), (), ())
        else:
            selection = selector.select(request.messages, top_k=k, extra=extra, keep=named)
        tools = [self._compact(t) for t in selection.tools] if self.compact else list(selection.tools)
        if offer_find_tools is None:
            offer_find_tools = self.recovery in ("find_tools", "both")
        # A stream goes out as it comes, with no turn to run a search in: it is not offered one.
        offered = (offer_find_tools and not request.stream and len(selection.tools) < len(index)
                   and FIND_TOOLS not in index)
        if offered:
            tools.append(FIND_TOOLS_SCHEMA)
        changes: dict[str, Any] = {"tools": tools}
        if not offered and request.named_tool == FIND_TOOLS and FIND_TOOLS not in index:
            # The re-run after a search offers no search: a choice that forced it now forces a real tool.
            changes["params"] = {**request.params, "tool_choice": "required"}
        absent = [n for n in self.pinned if n not in index]
        record_event(self.name, "selected", pool=len(index), sent=list(selection.names),
                     pinned=list(selection.pinned), used=list(selection.used),
                     **({"pinned_absent": absent} if absent else {}))
        if top_k is None and not extra and len(pool) > k:  # a call's own selection, not a recovery's
            self._note_changed_selection(request, selector, k, named, selection, tools)
        return _Plan(request.override(**changes), index, selector, frozenset(selection.names), offered,
                     key=_sent_key(request, index, request.messages))

    def _note_changed_selection(self, request: ChatRequest, selector: ToolSelector, k: int,
                                named: Sequence[str], selection: Selection, tools: Sequence[Tool]) -> None:
        """The tool block leads the prompt: when the previous call of this conversation (its messages, selected
        the same way) got other tools, none of that prompt is a cached prefix any more. Noted as the other
        stages note their edits, so the savings report is honest about provider caching."""
        end = previous_prompt_end(request.messages)
        if end == 0:
            return
        key = _sent_key(request, selector.index, request.messages[:end])
        sent_before = self._sent_for.get([key]).get(key)
        prompt_before = self._prompt_for.get([key]).get(key)
        if sent_before is None and request.conversation_id is not None:
            # The pool changed since that call (same names, other schemas or order): its block is the conversation's last.
            conversation = (request.namespace, request.conversation_id)
            sent_before = self._last_block.get([conversation]).get(conversation)
            prompt_before = self._last_prompt.get([conversation]).get(conversation)
        if sent_before is not None:  # what that call was really sent (a re-run's tools, a forced tool, compacted)
            names_before = [t["function"]["name"] for t in sent_before]
            # By content, not names: a schema edited under the same name changes the prompt as much as another tool.
            if [tool_hash(t) for t in sent_before] != [tool_hash(t) for t in tools]:
                # The prompt that call really sent (its usage: documents rendered, duplicates collapsed by later
                # stages), less the head both tool blocks keep cached.
                tokens = prompt_before if prompt_before else self.counter.count_prompt(request.messages[:end],
                                                                                          list(sent_before))
                tokens = max(0, tokens - self._kept_head(request.messages[:end], sent_before, tools))
                record_event(self.name, "prefix_invalidated", tokens=tokens, first_message=0,
                             tools_before=[n for n in names_before if n != FIND_TOOLS])
            return
        # Not seen by this stage (another process, a restart): selected again the same way.
        before = selector.select(request.messages[:end], top_k=k, keep=named)
        if before.names != selection.names:
            tokens = self.counter.count_prompt(request.messages[:end], list(before.tools))
            if request.conversation_id is not None:
                # Counted here, before later stages shrank it (a summary, cleared results): never more than the
                # conversation's previous call really sent.
                last = self._last_prompt.get([(request.namespace, request.conversation_id)])
                tokens = min(tokens, last.get((request.namespace, request.conversation_id), tokens))
            tokens = max(0, tokens - self._kept_head(request.messages[:end], list(before.tools), tools))
            record_event(self.name, "prefix_invalidated", tokens=tokens, first_message=0,
                         tools_before=list(before.names))

    def _kept_head(self, messages: Sequence[Any], before: Sequence[Tool], now: Sequence[Tool]) -> int:
        """Leading prompt tokens the two tool blocks share (the template's opening, a system message rendered
        before the tools): a prefix cache keeps them. Needs the model's own token ids (a GGUF model)."""
        token_ids = getattr(self.counter, "tokens", None)
        if not callable(token_ids) or not messages:
            return 0
        head = [dict(m) for m in messages if m.get("role") in ("system", "developer")][:1] or [dict(messages[0])]
        old, new = token_ids(head, list(before)), token_ids(head, list(now))
        return shared_prefix(old, new)

    def _remember_prompt(self, plan: _Plan, result: Any) -> None:
        """The prompt tokens the backend reported for this call: what later stages really sent."""
        if not isinstance(result, ChatResponse) or not result.usage.prompt_tokens:
            return
        self._prompt_for.put({plan.key: result.usage.prompt_tokens})
        if plan.request.conversation_id is not None:
            self._last_prompt.put({(plan.request.namespace, plan.request.conversation_id): result.usage.prompt_tokens})

    def _remember_sent(self, plan: _Plan) -> None:
        self._sent_for.put({plan.key: list(plan.request.tools)})
        if plan.request.conversation_id is not None:
            self._last_block.put({(plan.request.namespace, plan.request.conversation_id): list(plan.request.tools)})

    def _compact(self, tool: Tool) -> Tool:
        key = tool_hash(tool)
        with self._lock:
            hit = self._compacted.get(key)
            if hit is None:
                if len(self._compacted) > 4096:
                    self._compacted.clear()
                hit = self._compacted[key] = compact_tool(tool)
        return hit

    # -- recovery -----------------------------------------------------------------------------------
    def _recovery(self, request: ChatRequest, plan: _Plan, response: ChatResponse) -> _Plan | None:
        """The plan of the one re-run this response calls for, or None; raises on an unknown tool."""
        self._check_names(plan, response)
        names = [str((c.get("function") or {}).get("name")) for c in response.tool_calls]
        missing = _unsent(plan, response)
        queries = [_find_tools_query(c) for c in response.tool_calls
                   if plan.offered_find_tools and (c.get("function") or {}).get("name") == FIND_TOOLS]
        rerun = self.recovery in ("rerun", "both")
        if missing and not rerun:
            record_event(self.name, "tool_not_sent", tools=missing, recovered=False)
        if queries:
            # A blank query ("", {}) searched for nothing and found whatever came first: search with the
            # request instead, as the first selection did.
            asked = next((message_text(m) for m in reversed(request.messages) if m.get("role") == "user"), "")
            # A small model fills the argument with the schema's own words ("What the needed tool should do.":
            # SmolLM2 does so for most requests): that searched for "needed" and found the paint calculator.
            queries = [q if q.strip() and not _parrots_schema(q) else asked for q in queries]
            found = list(dict.fromkeys(n for q in queries for n in plan.index.search(q, self.top_k)))
            found = [n for n in found if n not in plan.sent] or found
            # The queries are the user's words (or the model's, which may quote them): keys out, as in quarantine notes.
            record_event(self.name, "find_tools", queries=[redact(q) for q in queries], found=found)
            searched = self._plan(request, extra=[*found, *(missing if rerun else [])], offer_find_tools=False)
            return dataclasses.replace(searched, searched=True) if searched is not None else None
        if missing and rerun:
            record_event(self.name, "tool_not_sent", tools=missing, recovered=True)
            return self._plan(request, extra=missing, offer_find_tools=False)
        # Under tool_choice "none" the app asked for no call: more tools cannot change the answer, only bill it twice.
        if (rerun and not names and request.params.get("tool_choice") != "none"
                and _lacks_tool(response.content or "") and len(plan.sent) < len(plan.index)):
            record_event(self.name, "model_lacks_tool", retry_top_k=2 * self.top_k)
            return self._plan(request, top_k=2 * self.top_k, offer_find_tools=False)
        return None

    # -- streams --------------------------------------------------------------------------------------
    def _checked_stream(self, plan: _Plan, stream: ChatStream) -> ChatStream:
        """The same chunks; at the end, the names are checked as a whole answer's are (UnknownToolError
        fails the stream, and the ledger records it), and an unsent tool is noted."""
        record = event_recorder()

        def chunks() -> Any:
            try:
                yield from stream
            finally:
                stream.close()  # after the end a no-op; before it, the backend lets go
            self._check_stream_end(plan, stream, record)

        return ChatStream.relaying(stream, chunks())

    def _achecked_stream(self, plan: _Plan, stream: AsyncChatStream) -> AsyncChatStream:
        record = event_recorder()

        async def chunks() -> Any:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()
            self._check_stream_end(plan, stream, record)

        return AsyncChatStream.relaying(stream, chunks())

    def _check_stream_end(self, plan: _Plan, stream: ChatStream | AsyncChatStream, record: EventRecorder) -> None:
        if stream.response is None:
            return  # abandoned or failed: the pipeline records it as such
        self._check_names(plan, stream.response, record)
        missing = _unsent(plan, stream.response)
        if missing:
            record(self.name, "tool_not_sent", tools=missing, recovered=False)

    def _check_second(self, retry: _Plan, response: ChatResponse) -> None:
        """A re-run's answer is not recovered again, but what it calls out of the selection is still noted."""
        self._check_names(retry, response)
        missing = _unsent(retry, response)
        if missing:
            record_event(self.name, "tool_not_sent", tools=missing, recovered=False)

    def _check_names(self, plan: _Plan, response: ChatResponse, record: EventRecorder = record_event) -> None:
        for call in response.tool_calls:
            name = (call.get("function") or {}).get("name")
            if name not in plan.index and not (plan.offered_find_tools and name == FIND_TOOLS):
                record(self.name, "unknown_tool", tool=name)
                # The re-run after a search offers none: a model that searches again was not offered it.
                detail = None
                if name == FIND_TOOLS:
                    detail = (f"the model called {FIND_TOOLS} again after its one search, which the re-run did not "
                              "offer" if plan.searched else
                              f"the model called {FIND_TOOLS}, which this call did not offer (it is offered only "
                              "with recovery='find_tools' or 'both', and never on a stream)")
                raise UnknownToolError(str(name), len(plan.index), detail)


def _sent_key(request: ChatRequest, index: ToolIndex, messages: Sequence[dict[str, Any]]) -> str:
    """What a tool block sent is remembered by: the namespace and the pool it was chosen from, besides the
    prompt. By the messages alone, another tenant whose conversation opens alike ("Hello") found this one's
    selection: its ledger named the other tenant's tools and counted their tokens as un-cached."""
    blob = json.dumps([request.namespace, index.catalog_hash, list(messages)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _unsent(plan: _Plan, response: ChatResponse) -> list[str]:
    """Catalog tools the answer calls that the plan did not send."""
    names = [str((c.get("function") or {}).get("name")) for c in response.tool_calls]
    return [n for n in dict.fromkeys(names) if n in plan.index and n not in plan.sent]


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


# What find_tools' schema itself says: a query that only repeats it asks for nothing.
_SCHEMA_WORDS = frozenset({
    _words(FIND_TOOLS_SCHEMA["function"]["description"]),
    _words(FIND_TOOLS_SCHEMA["function"]["parameters"]["properties"]["query"]["description"]),
    "query", "find tools", "find_tools", "",
})


def _parrots_schema(query: str) -> bool:
    return _words(query) in _SCHEMA_WORDS


def _find_tools_query(call: dict[str, Any]) -> str:
    arguments = (call.get("function") or {}).get("arguments") or ""
    try:
        parsed = json.loads(arguments)
    except (json.JSONDecodeError, TypeError):
        return str(arguments)
    # Only text is a query: {"query": null} searched for "None" instead of falling back to the request.
    if isinstance(parsed, dict):
        query = parsed.get("query")
        return query if isinstance(query, str) and query.strip() else \
            " ".join(v for v in parsed.values() if isinstance(v, str))
    return parsed if isinstance(parsed, str) else ""
