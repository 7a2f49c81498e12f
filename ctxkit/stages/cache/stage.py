"""SemanticCacheStage: answer a request from an earlier response, when and only when that response is
the right answer to it. ExactCacheStage: the same without the semantic layer.

A lookup runs two layers: the exact layer (the hash of the normalized, scoped request) and the semantic
layer (the nearest earlier questions in the same scope, by MiniLM similarity, each checked by the
precision guards of guards.py and, for follow-ups, by the earlier turns). A hit answers without calling
the rest of the pipeline, so the ledger shows every prompt and completion token saved.

Never cached: errors (nothing is stored unless an answer came back), answers with tool calls unless
every tool called is marked pure, streams that did not complete, requests with quarantined content,
sampled requests (temperature above zero, or unset, so the backend's non-zero default) unless
`cache_sampled=True`, requests with n > 1, and requests whose metadata says `{"cache": False}`.

Kept a short time only: answers to time-sensitive questions ("What's the weather in Paris today?", "BTC
price right now", "Is GitHub down?", see freshness.py), for `time_sensitive_ttl` seconds (60 by default;
0: not stored at all). The ledger notes each such answer with the word that made it time-sensitive.

Identical requests that arrive while the first is being answered wait for it (single-flight through the
store) instead of calling the backend again; streams are not single-flighted (their answer is only
known when the caller has read them to the end).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..._aio import enter_in_thread, tracked_to_thread
from ...embed import DEFAULT_MODEL_ID, probe_vector
from ...errors import ConfigurationError, RequestError
from ...pipeline import EventRecorder, event_recorder, naive_after, record_event
from ...quarantine_marks import AnswerCheck, answer_quarantined, current_answer_check, has_quarantined
from ...request import ChatRequest
from ...response import AsyncChatStream, ChatResponse, ChatStream, Usage, response_as_chunks
from ...settings import name_list, number_between, positive_seconds, whole_number
from ...stage import AsyncCallNext, AsyncResult, CallNext, Result, Stage
from .freshness import time_cue
from .guards import Thresholds, judge, judge_facts
from .keys import RequestKey, code_lines, content_text, request_key
from .store import CacheEntry, CacheStore, Hit

_REFUSED_FINISH = {"content_filter", "error"}
DEFAULT_TIME_SENSITIVE_TTL = 60.0  # seconds; see SemanticCacheStage's `time_sensitive_ttl`
# OpenAI's `metadata` holds strings only: {"cache": "false"} opts out as {"cache": False} does.
_OFF = {"false", "0", "no", "off"}


@dataclasses.dataclass
class Lookup:
    """The outcome of looking a request up: a hit (with its layer) or why there was none."""

    key: RequestKey
    response: ChatResponse | None = None
    layer: str | None = None  # "exact" | "semantic"
    similarity: float | None = None
    reason: str | None = None  # why it missed or could not be cached ("sampled", "similarity", "negation"...)
    cacheable: bool = True
    vector: np.ndarray | None = None
    context_vector: np.ndarray | None = None
    embed_ms: float = 0.0  # time spent embedding, the bulk of a semantic lookup


class SemanticCacheStage(Stage):
    """An exact and a semantic cache layer in front of the rest of the pipeline.

    store:         where answers live (LocalStore, PostgresStore).
    embedder:      a ctxkit.embed.Embedder (MiniLM); share one between stages.
    thresholds:    similarity thresholds (guards.Thresholds; calibrated, see bench/cache.py).
    ttl:           seconds an answer stays valid (None: until evicted); `namespace_ttl` overrides it per
                   namespace and `request.metadata["cache_ttl"]` per request.
    cache_sampled: also cache requests sampled at temperature > 0 (or unset).
    pure_tools:    tools whose results do not depend on outside state; answers that call only these may
                   be cached.
    default_model: the backend's model, for requests that name none (keeps two backends apart in a
                   shared store).
    candidates:    semantic neighbours checked per lookup.
    time_sensitive_ttl: the longest an answer to a time-sensitive question is kept and served (freshness.py:
                   "today", "right now", "current", the weather, a price...). 60 s by default: a clock
                   reading's granularity, shorter than the time a forecast, a quote or a site's status takes
                   to change, and long enough for retries and identical concurrent calls to share one answer.
                   0: such answers are not stored (noted in the ledger as "time_sensitive"); None: no special
                   TTL (they live as long as any other answer).
    """

    name = "semantic_cache"
    semantic = True

    def __init__(
        self,
        store: CacheStore,
        embedder: Any = None,
        *,
        thresholds: Thresholds | None = None,
        ttl: float | None = None,
        namespace_ttl: Mapping[str, float] | None = None,
        cache_sampled: bool = False,
        pure_tools: Sequence[str] = (),
        default_model: str | None = None,
        candidates: int = 8,
        time_sensitive_ttl: float | None = DEFAULT_TIME_SENSITIVE_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if self.semantic and embedder is None:
            raise ConfigurationError("SemanticCacheStage needs an embedder (ctxkit.embed.Embedder)")
        if ttl is not None:
            ttl = positive_seconds(ttl, "ttl (None: until evicted)")
        candidates = whole_number(candidates, "candidates", minimum=1)
        if isinstance(time_sensitive_ttl, bool) or (time_sensitive_ttl is not None and time_sensitive_ttl != 0):
            time_sensitive_ttl = positive_seconds(time_sensitive_ttl, "time_sensitive_ttl (0: not stored, None: no "
                                                                      "special TTL)")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise ConfigurationError(f"thresholds must be a Thresholds, got {type(thresholds).__name__}")
        for field in ("similarity", "context_similarity", "added_detail_similarity"):  # cosines: [-1, 1]
            number_between(getattr(thresholds or Thresholds(), field), f"thresholds.{field}", -1, 1)
        for ns, seconds in (namespace_ttl or {}).items():
            if seconds is None:  # as for `ttl`: this namespace's answers stay until evicted
                continue
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
                raise ConfigurationError(f"namespace_ttl[{ns!r}] must be a positive number of seconds or None (until "
                                         f"evicted), got {seconds!r} (to keep a namespace out of the cache, send "
                                         "its requests with metadata {'cache': False})")
        embedder_dimension, store_dimension = getattr(embedder, "dimension", None), getattr(store, "dimension", None)
        if (self.semantic and isinstance(embedder_dimension, int) and isinstance(store_dimension, int)
                and embedder_dimension != store_dimension):
            # else every call fails: a ValueError (LocalStore), a RequestError blaming the caller (PostgresStore)
            raise ConfigurationError(f"the embedder makes {embedder_dimension}-dimensional vectors but the cache "
                                     f"store holds {store_dimension}: open the store with "
                                     f"dimension={embedder_dimension} (another directory or table_prefix)")
        self.store = store
        self.embedder = embedder
        self._embedder_probe: np.ndarray | None = None
        self.thresholds = thresholds or Thresholds()
        self.ttl = ttl
        self.namespace_ttl = dict(namespace_ttl or {})
        self.cache_sampled = cache_sampled
        self.pure_tools = frozenset(name_list(pure_tools, "pure_tools"))
        self.default_model = default_model
        self.candidates = candidates
        self.time_sensitive_ttl = None if time_sensitive_ttl is None else float(time_sensitive_ttl)
        self.clock = clock
        self.counts: collections.Counter[str] = collections.Counter()
        # Async callers of one key queue here, in the event loop, before the store's (blocking) single-flight
        # lock: waiters parked in worker threads would fill asyncio's default pool, and the caller holding
        # the lock needs a thread from that pool to store its answer and let go of it.
        self._aflights: dict[tuple[int, str], list[Any]] = {}
        self._aflights_guard = threading.Lock()

    # -- the hooks ----------------------------------------------------------------------------------
    def wrap_call(self, request: ChatRequest, call_next: CallNext) -> Result:
        found = self.lookup(request)
        if found.response is not None:
            return self._answer(request, found.response)
        if not found.cacheable:
            return call_next(request)
        if request.stream:
            result = call_next(request)
            if isinstance(result, ChatStream):
                result.on_complete(self._remember_when_complete(request, found, result))
            return result
        with self.store.single_flight(found.key.exact):
            again = self._exact(found.key, self._max_age(request))  # the first caller may have answered while we waited
            if again is not None:
                self._note_hit(found.key, "exact", None, "single_flight")
                return self._answer(request, again)
            result = call_next(request)
            if isinstance(result, ChatResponse):
                self.remember(request, result, found)
            return result

    async def awrap_call(self, request: ChatRequest, call_next: AsyncCallNext) -> AsyncResult:
        found = await tracked_to_thread(self.lookup, request)
        if found.response is not None:
            return self._aanswer(request, found.response)
        if not found.cacheable:
            return await call_next(request)
        if request.stream:
            result = await call_next(request)
            if isinstance(result, AsyncChatStream):
                result.on_complete(self._remember_when_complete(request, found, result))
            return result
        async with self._async_flight(found.key.exact):
            flight = self.store.single_flight(found.key.exact)
            await enter_in_thread(flight)  # a blocking lock: wait for it off the event loop
            try:
                again = await tracked_to_thread(self._exact, found.key, self._max_age(request))
                if again is not None:
                    self._note_hit(found.key, "exact", None, "single_flight")
                    return self._aanswer(request, again)
                result = await call_next(request)
                if isinstance(result, ChatResponse):
                    await tracked_to_thread(self.remember, request, result, found)
                return result
            finally:
                await tracked_to_thread(flight.__exit__, None, None, None)

    @contextlib.asynccontextmanager
    async def _async_flight(self, key: str) -> Any:
        """One task per key (per event loop) at a time goes on to the store's lock; the others wait here."""
        slot_key = (id(asyncio.get_running_loop()), key)
        with self._aflights_guard:
            slot = self._aflights.setdefault(slot_key, [asyncio.Lock(), 0])
            slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            with self._aflights_guard:
                slot[1] -= 1
                if slot[1] == 0:
                    self._aflights.pop(slot_key, None)

    # -- lookup and remember (public: the benchmark and applications use them directly) ------------
    def lookup(self, request: ChatRequest) -> Lookup:
        """Find an answer for `request` in the exact layer, then the semantic layer."""
        key = request_key(_with_offered_tools(request), self.default_model)
        reason = self._not_cacheable(request)
        if reason is not None:
            self.counts[f"skipped_{reason}"] += 1
            record_event(self.name, "skip", reason=reason)
            return Lookup(key=key, reason=reason, cacheable=False)
        max_age = self._max_age(request)
        exact = self._exact(key, max_age)
        if exact is not None:
            self._note_hit(key, "exact", None)
            return Lookup(key=key, response=exact, layer="exact", similarity=1.0)
        if not self._semantic_for(key):
            self.counts["misses"] += 1
            return Lookup(key=key, reason="exact_miss")
        texts = [key.query] + ([key.context] if key.context else [])
        t0 = time.perf_counter()
        vectors = self.embedder.embed(texts)
        embed_ms = (time.perf_counter() - t0) * 1000
        vector = vectors[0]
        context_vector = vectors[1] if key.context else None
        hits = self.store.search(key.scope, vector, self.candidates, self.clock())
        reason = "no_candidate"
        for hit in hits:
            if max_age is not None and self.clock() - hit.entry.created_at > max_age:
                continue  # stored under a longer TTL than this request or namespace now allows
            verdict = self._judge(key, context_vector, hit)
            if verdict is None:
                self._note_hit(key, "semantic", hit.similarity)
                return Lookup(key=key, response=_response_from(hit.entry.response, self.name), layer="semantic",
                              similarity=hit.similarity, vector=vector, context_vector=context_vector,
                              embed_ms=embed_ms)
            if verdict != "similarity":
                self.counts[f"vetoed_{verdict}"] += 1
                record_event(self.name, "veto", reason=verdict, similarity=round(hit.similarity, 4))
            if reason in ("no_candidate", "similarity"):
                reason = verdict
        self.counts["misses"] += 1
        return Lookup(key=key, reason=reason, vector=vector, context_vector=context_vector, embed_ms=embed_ms)

    def remember(self, request: ChatRequest, response: ChatResponse, found: Lookup | None = None, *,
                 record: EventRecorder = record_event, answer_check: AnswerCheck | None = None) -> bool:
        """Store `response` as the answer to `request`, if it may be cached. Returns whether it was.
        `record`: where its ledger note goes (a stream's end runs after its call returned: `event_recorder()`)."""
        found = found or Lookup(key=request_key(_with_offered_tools(request), self.default_model))
        reason = self._not_cacheable(request) or self._not_storable(response)
        if reason is None and answer_quarantined(response.message, record, answer_check) is not None:
            reason = "quarantined_answer"  # contradicted by its own step's tool results, or passing on an injection
        if reason is not None:
            self.counts[f"not_stored_{reason}"] += 1
            record(self.name, "not_stored", reason=reason)
            return False
        key = found.key
        vector = found.vector
        context_vector = found.context_vector
        semantic = self._semantic_for(key)
        if semantic and vector is None:
            vectors = self.embedder.embed([key.query] + ([key.context] if key.context else []))
            vector, context_vector = vectors[0], (vectors[1] if key.context else None)
        if vector is None or not semantic:
            dimension = getattr(self.store, "dimension", 384)
            vector = np.zeros(dimension, dtype=np.float32)  # exact-only: a zero vector never passes a threshold
        now = self.clock()
        configured = self.namespace_ttl.get(request.namespace, self.ttl)
        ttl = _ttl(request, configured)
        if configured is not None and ttl is not None:
            ttl = min(ttl, configured)  # a request may shorten the operator's TTL, never lengthen it
        cue = self._time_cue(request)
        if cue is not None and self.time_sensitive_ttl is not None and (ttl is None or self.time_sensitive_ttl < ttl):
            ttl = self.time_sensitive_ttl
            self.counts["short_ttl_time_sensitive"] += 1
            record(self.name, "short_ttl", reason="time_sensitive", cue=cue, ttl=ttl)
        features: dict[str, Any] = {"query": key.query, "context": key.context, "raw": key.raw,
                                    "semantic": semantic, "facts": key.facts,
                                    "tool_facts": key.tool_facts, "layout": key.layout,
                                    "history": key.history, "context_read": self._context_read(key),
                                    "context_code": key.context_code,
                                    "embedder": self._embedder_id()}
        probe = self._probe()
        if probe is not None:  # which model this is, for a model named only by its folder (see _same_model)
            features["embedder_probe"] = _pack(probe)
        if context_vector is not None:
            features["context_vector"] = _pack(context_vector)
        entry = CacheEntry(
            key=key.exact, scope=key.scope, namespace=request.namespace, query_text=key.query,
            response=response.to_openai(), created_at=now, expires_at=None if ttl is None else now + ttl,
            features=features,
        )
        if self.store.put(entry, vector) is False:  # refused (a full disk, its server down, too large): the store logged why
            self.counts["not_stored_store_refused"] += 1
            record(self.name, "not_stored", reason="store_refused")
            return False
        self.counts["stored"] += 1
        return True

    def _remember_when_complete(self, request: ChatRequest, found: Lookup,
                                stream: ChatStream | AsyncChatStream) -> Callable[[ChatResponse], None]:
        """A stream's on_complete callback: only a stream read to its end, that said how it ended, is stored.
        Its notes go to this call's ledger record: the stream ends after the call returned (no call current)."""
        record = event_recorder()
        check = current_answer_check()

        def callback(response: ChatResponse) -> None:
            if not stream.finished:
                self.counts["not_stored_unfinished"] += 1
                record(self.name, "not_stored", reason="unfinished")
                return
            self.remember(request, response, found, record=record, answer_check=check)

        return callback

    def stats(self) -> dict[str, Any]:
        """This stage's counters (hits by layer, misses, vetoes by guard, skips by reason) and the store's."""
        return {"stage": dict(self.counts), "store": self.store.stats()}

    # -- helpers ------------------------------------------------------------------------------------
    def _not_cacheable(self, request: ChatRequest) -> str | None:
        opt = request.metadata.get("cache")
        if opt is False or opt == 0 or (isinstance(opt, str) and opt.strip().lower() in _OFF):  # 0: JSON's false
            return "opted_out"
        _ttl(request, None)  # a malformed cache_ttl is the caller's error, found before the backend is called
        if has_quarantined(request):
            return "quarantined"
        temperature = request.params.get("temperature")
        if not self.cache_sampled and (temperature is None or float(temperature) > 0):
            return "sampled"
        if int(request.params.get("n", 1) or 1) > 1:
            return "n_choices"
        if request.params.get("logprobs"):
            return "logprobs"  # they belong to one generation: a stored answer has none to give
        if self.time_sensitive_ttl == 0 and self._time_cue(request) is not None:
            return "time_sensitive"  # neither served (an answer stored before may be stale) nor stored
        return None

    def _time_cue(self, request: ChatRequest) -> str | None:
        """What makes this request's answer depend on when it is asked (freshness.py), in its last user
        message or, for a follow-up ("and in Tokyo?" after "the weather in Paris today"), the one before."""
        if self.time_sensitive_ttl is None:
            return None
        asked = [content_text(m.get("content")) for m in request.messages if m.get("role") == "user"]
        for text in reversed(asked[-2:]):
            cue = time_cue(text)
            if cue is not None:
                return cue
        return None

    def _not_storable(self, response: ChatResponse) -> str | None:
        if response.answered_by is not None and response.answered_by != "":
            return "not_from_backend"
        if response.finish_reason in _REFUSED_FINISH or response.message.get("refusal"):
            return "refused"  # OpenAI's refusal to fill a schema says finish_reason "stop"
        calls = response.tool_calls
        if calls and not all((c.get("function") or {}).get("name") in self.pure_tools for c in calls):
            return "impure_tool_call"
        if not calls and not (response.content or "").strip():
            return "empty"
        return None

    def _max_age(self, request: ChatRequest) -> float | None:
        """The oldest answer this request may get: the namespace's (or the stage's) TTL, the request's own
        `cache_ttl` and, for a time-sensitive question, `time_sensitive_ttl`, whichever is shortest. Applied
        when reading, so a TTL lowered by the operator, or asked by one request, also holds for answers
        stored before under a longer one."""
        configured = self.namespace_ttl.get(request.namespace, self.ttl)
        asked = _ttl(request, None)
        fresh = self.time_sensitive_ttl if self._time_cue(request) is not None else None
        ages = [age for age in (configured, asked, fresh) if age is not None]
        return min(ages) if ages else None

    def _exact(self, key: RequestKey, max_age: float | None = None) -> ChatResponse | None:
        now = self.clock()
        entry = self.store.get(key.exact, now)
        if entry is None or entry.scope != key.scope:
            return None
        if max_age is not None and now - entry.created_at > max_age:
            return None
        return _response_from(entry.response, self.name)

    def _judge(self, key: RequestKey, context_vector: np.ndarray | None, hit: Hit) -> str | None:
        features = hit.entry.features or {}
        if not features.get("semantic", True):
            return "similarity"
        if not self._same_model(features):
            return "embedder"  # vectors of another model (same dimension): their similarity means nothing
        if code_lines(key.layout) != code_lines(str(features.get("layout", ""))):
            return "layout"  # pasted code, where indentation and line breaks change the meaning, differs
        if key.context:
            reason = judge_facts(key.facts, str(features.get("facts", "")), key.tool_facts,
                                 str(features.get("tool_facts", "")))
            if reason is not None:
                return reason
            if _code_of(key.context_code) != _code_of(str(features.get("context_code", ""))):
                # Code the assistant wrote or a tool returned, differing in line breaks or indentation only:
                # the context text reads it with whitespace collapsed ("what does it print?" after a loop).
                return "context_layout"
            if not (self._context_read(key) and features.get("context_read") is True) \
                    and key.history != features.get("history"):
                # The context check read only part of the earlier turns (the newest 6 messages, their last
                # 2,000 characters, the first 256 word pieces of those): what it did not read must agree
                # word for word. "Which city did you pick?" after "Tokyo" ten turns up, "Who pays?" after
                # a pasted lease that ends "the tenant pays" / "the landlord pays".
                return "context_unread"
        candidate_context = str(features.get("context", ""))
        context_similarity = None
        if context_vector is not None and features.get("context_vector"):
            context_similarity = float(np.dot(context_vector, _unpack(features["context_vector"])))
        return judge(key.query, key.context, hit.entry.query_text, candidate_context,
                     hit.similarity, context_similarity, self.thresholds,
                     query_raw=key.raw, candidate_raw=str(features.get("raw", "")) or None)

    def _context_read(self, key: RequestKey) -> bool:
        """Whether the context check reads all of the earlier turns: none left out of the context text, and
        the embedder reads all of that text."""
        if key.context_cut:
            return False
        truncates = getattr(self.embedder, "truncates", None)
        return not (callable(truncates) and truncates(key.context))

    def _semantic_for(self, key: RequestKey) -> bool:
        """Whether the semantic layer may answer (and store) this request: it has a question, and the
        embedder reads all of it. A question longer than the model's window (a pasted document) embeds
        as its first 256 word pieces, so another document with the same beginning scores 1.0: such
        requests use the exact layer only."""
        if not self.semantic or not key.query:
            return False
        truncates = getattr(self.embedder, "truncates", None)
        return not (callable(truncates) and truncates(key.query))

    def _embedder_id(self) -> str:
        if self.embedder is None:
            return ""
        return f"{getattr(self.embedder, 'model_id', type(self.embedder).__name__)}/{getattr(self.embedder, 'dimension', '')}"

    def _probe(self) -> np.ndarray | None:
        """What a model named by its folder makes of a fixed text (None for the packaged MiniLM, whose name
        says which model it is): two models in folders of one name, or one retrained in place, share a name."""
        if self.embedder is None or getattr(self.embedder, "model_id", None) == DEFAULT_MODEL_ID:
            return None
        if self._embedder_probe is None:
            self._embedder_probe = probe_vector(self.embedder)
        return self._embedder_probe

    def _same_model(self, features: Mapping[str, Any]) -> bool:
        """Whether an entry's vectors were made by this model: same name and dimension, and for a model named
        by its folder the same answer to the probe text, within cosine 0.9999. That admits the same model at
        another precision (bfloat16 against float32: 0.99996) or on another CPU, and refuses a model retrained
        in place (0.98 for the test's small drift); an entry without a probe is refused."""
        if features.get("embedder") != self._embedder_id():
            return False
        probe = self._probe()
        if probe is None:
            return True
        stored = features.get("embedder_probe")
        if not stored:
            return False
        theirs = _unpack(str(stored))
        return theirs.shape == probe.shape and float(
            np.dot(theirs, probe) / (np.linalg.norm(theirs) * np.linalg.norm(probe))) >= 0.9999

    def _note_hit(self, key: RequestKey, layer: str, similarity: float | None, via: str | None = None) -> None:
        self.counts[f"hits_{layer}"] += 1
        data: dict[str, Any] = {"layer": layer}
        if similarity is not None:
            data["similarity"] = round(similarity, 4)
        if via:
            data["via"] = via
        record_event(self.name, "hit", **data)

    def _answer(self, request: ChatRequest, response: ChatResponse) -> Result:
        if not request.stream:
            return response
        stream = ChatStream(iter(response_as_chunks(response)), backend=response.backend, model=response.model,
                            count_completion=None)
        return stream

    def _aanswer(self, request: ChatRequest, response: ChatResponse) -> AsyncResult:
        if not request.stream:
            return response
        return AsyncChatStream(_replay(response_as_chunks(response)), backend=response.backend,
                               model=response.model, count_completion=None)


class ExactCacheStage(SemanticCacheStage):
    """Only the exact layer: no embedder, no semantic search."""

    name = "exact_cache"
    semantic = False


async def _replay(chunks: list[dict[str, Any]]) -> Any:
    for chunk in chunks:
        yield chunk


def _ttl(request: ChatRequest, default: float | None) -> float | None:
    value = request.metadata.get("cache_ttl", default)
    if value is None:
        return None
    if isinstance(value, str):  # OpenAI's `metadata` holds strings only: "60" is 60 seconds, as before
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        try:
            value = float(value)
        except OverflowError:  # a JSON integer past float's range (10**400): no finite number of seconds
            value = float("inf")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise RequestError(f"must be a positive number of seconds, got {value!r}", 'metadata["cache_ttl"]')
    return float(value)


def _code_of(text: str) -> list[Any]:
    """The code lines of a context_code feature; an entry stored before the feature existed has none."""
    return [lines for lines in json.loads(text) if lines] if text else []


def _pack(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype=np.float16).tobytes()).decode()


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float16).astype(np.float32)


def _response_from(data: Mapping[str, Any], stage: str) -> ChatResponse:
    """A fresh ChatResponse from a stored chat.completion dict (a new id: it is a new answer)."""
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return ChatResponse(
        message=dict(choice["message"]),
        finish_reason=choice.get("finish_reason") or "stop",
        usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                    int(details.get("cached_tokens") or 0)),
        model=data.get("model", ""),
        backend=f"cache:{stage}",
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        answered_by=stage,
    )


__all__ = ["ExactCacheStage", "Lookup", "SemanticCacheStage"]


def _with_offered_tools(request: ChatRequest) -> ChatRequest:
    """`request` with the tools its answer is chosen among: a catalog registered with a later ToolRetrievalStage
    is part of the key (an answer given without a weather tool must not answer once there is one). Only the
    tools: what else a later stage supplies (documents rendered into the question) is in the scope already."""
    tools = naive_after(request).tools
    return request.override(tools=tools) if tools != request.tools else request
