"""Settings a stage is built with are checked when it is built (ctxkit.settings): a wrong type, NaN, a value out
of range or a conflicting pair is a ConfigurationError naming the setting, not a TypeError / KeyError on the first
call, nor a RequestError blaming the request's metadata (ttl=NaN), nor a setting silently off."""

import math

import pytest

from ctxkit import ConfigurationError
from ctxkit.stages.cache import LocalStore, SemanticCacheStage
from ctxkit.stages.cache.guards import Thresholds
from ctxkit.stages.pruning import DedupStage, DocumentPruningStage
from ctxkit.stages.quarantine import QuarantineStage
from ctxkit.stages.summarize import SummarizationStage
from ctxkit.stages.tools import ToolRetrievalStage


@pytest.mark.parametrize("settings, message", [
    ({"trigger_tokens": "100"}, "trigger_tokens must be a whole number"),
    ({"trigger_tokens": math.nan}, "trigger_tokens must be a whole number"),
    ({"trigger_messages": 2.5}, "trigger_messages must be a whole number"),
    ({"keep_last": 2.5}, "keep_last must be a whole number"),
    ({"keep_last": math.nan}, "keep_last must be a whole number"),
    ({"context_turns": "8"}, "context_turns must be a whole number"),
    ({"model_share": "x"}, "model_share must be a number in"),
    ({"max_tail_fraction": "0.5"}, "max_tail_fraction must be a number in"),
    ({"target_tokens": 5000}, r"target_tokens \(5000\) must not exceed the token trigger \(1000"),
])
def test_summarization_settings_are_checked_when_built(llama_backend, settings, message):
    with pytest.raises(ConfigurationError, match=message):
        SummarizationStage(llama_backend, **{"trigger_tokens": 1000, "mode": "extractive", **settings})


def test_summarization_target_equal_to_trigger_is_still_fine(llama_backend):
    stage = SummarizationStage(llama_backend, trigger_tokens=500, target_tokens=500, mode="extractive")
    assert stage.target_tokens == stage.trigger_tokens == 500


@pytest.mark.parametrize("settings, message", [
    ({"ttl": math.nan}, "ttl .* must be a positive number of seconds"),
    ({"ttl": "60"}, "ttl .* must be a positive number of seconds"),
    ({"candidates": 0}, "candidates must be at least 1"),
    ({"candidates": "8"}, "candidates must be a whole number"),
    ({"thresholds": Thresholds(similarity=math.nan)}, r"thresholds.similarity must be a number in \[-1, 1\]"),
    ({"thresholds": Thresholds(similarity="0.7")}, r"thresholds.similarity must be a number in"),
    ({"thresholds": Thresholds(context_similarity=1.5)}, r"thresholds.context_similarity must be a number in"),
    ({"thresholds": {"similarity": 0.8}}, "thresholds must be a Thresholds"),
])
def test_cache_settings_are_checked_when_built(tmp_path, embedder, settings, message):
    store = LocalStore(tmp_path / "store", dimension=embedder.dimension)
    with pytest.raises(ConfigurationError, match=message):
        SemanticCacheStage(store, embedder, **settings)


def test_cache_guards_only_threshold_of_the_benchmark_is_allowed(tmp_path, embedder):
    store = LocalStore(tmp_path / "store", dimension=embedder.dimension)
    assert SemanticCacheStage(store, embedder, thresholds=Thresholds(similarity=-1.0), ttl=60).ttl == 60


@pytest.mark.parametrize("build, message", [
    (lambda: ToolRetrievalStage(max_indexes=-1), "max_indexes must be at least 1"),
    (lambda: ToolRetrievalStage(max_indexes=0), "max_indexes must be at least 1"),
    (lambda: QuarantineStage(max_records=math.nan), "max_records must be a whole number"),
    (lambda: QuarantineStage(max_records="10"), "max_records must be a whole number"),
    (lambda: DedupStage(min_tokens="30"), "min_tokens must be a whole number"),
    (lambda: DocumentPruningStage(budget_tokens=100, long_message_tokens=-1), "long_message_tokens must be at least 1"),
    (lambda: DocumentPruningStage(budget_tokens=100, long_message_tokens=math.nan),
     "long_message_tokens must be a whole number"),
])
def test_other_stage_settings_are_checked_when_built(build, message):
    with pytest.raises(ConfigurationError, match=message):
        build()


@pytest.mark.parametrize("settings, message", [
    ({"timeout": "60"}, "timeout must be a positive number of seconds"),
    ({"timeout": math.nan}, "timeout must be a positive number of seconds"),
    ({"backoff_s": "1"}, "backoff_s and max_backoff_s must be >= 0"),
])
def test_openai_backend_settings_are_checked_when_built(settings, message):
    from ctxkit import OpenAIBackend

    with pytest.raises(ConfigurationError, match=message):
        OpenAIBackend("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", **settings)


def test_openai_backend_still_takes_an_httpx_timeout():
    import httpx

    from ctxkit import OpenAIBackend

    OpenAIBackend("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", timeout=httpx.Timeout(5.0))
