"""DedupStage: later near-duplicates collapse, what differs survives, nothing else is touched."""

from __future__ import annotations

from ctxkit import ChatRequest
from ctxkit.stages.pruning import DedupStage
from ctxkit.stages.pruning.dedup import COLLAPSED_PREFIX, DUPLICATES_KEY, MinHasher
from ctxkit.validation import validate_request

REPORT = (
    "The quarterly report shows revenue of 4.2 million euros, up 12 percent on last year. Costs rose by "
    "3 percent, mainly from new hires in Oslo and Bergen. The board approved the budget for the next two "
    "quarters and asked for a hiring plan."
)


def _history() -> list[dict]:
    return [
        {"role": "system", "content": "You are a finance assistant."},
        {"role": "user", "content": "Read this: " + REPORT},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And this one: " + REPORT.replace("4.2 million", "4.3 million")},
        {"role": "assistant", "content": "Noted again."},
        {"role": "user", "content": "What was the revenue?"},
    ]


def test_later_near_duplicate_collapses_but_keeps_the_sentence_that_differs():
    out = DedupStage().before_model(ChatRequest(messages=_history()))
    collapsed = out.messages[3]["content"]
    assert collapsed.startswith(COLLAPSED_PREFIX + " 1")
    assert "4.3 million" in collapsed, "a changed number must survive the collapse"
    assert "Oslo and Bergen" not in collapsed, "sentences identical to message 1 must go"
    assert out.messages[1] == _history()[1], "the first copy (the cached prefix) must stay"


def test_the_newest_user_message_and_short_messages_are_never_edited():
    messages = _history()[:3] + [{"role": "user", "content": "Read this: " + REPORT}]
    out = DedupStage().before_model(ChatRequest(messages=messages))
    assert out.messages[-1] == messages[-1]
    chat = [{"role": "user", "content": "ok thanks"}, {"role": "assistant", "content": "ok thanks"},
            {"role": "user", "content": "bye"}]
    request = ChatRequest(messages=chat)
    assert DedupStage().before_model(request) is request


def test_duplicate_tool_results_collapse_without_orphaning_calls():
    messages: list[dict] = [{"role": "user", "content": "Check twice."}]
    for k in range(2):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{k}", "type": "function", "function": {"name": "read", "arguments": "{}"}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{k}", "content": REPORT})
    messages.append({"role": "user", "content": "Summarize."})
    out = DedupStage().before_model(ChatRequest(messages=messages))
    validate_request(out)
    assert out.messages[4]["content"].startswith(COLLAPSED_PREFIX)
    assert out.messages[4]["tool_call_id"] == "c1"


def test_different_texts_are_left_alone():
    messages = [
        {"role": "user", "content": REPORT},
        {"role": "assistant", "content": "The Oslo Opera House opened in 2008 and was designed by Snøhetta, "
                                         "an architecture firm that also designed the library in Alexandria."},
        {"role": "user", "content": "Thanks"},
    ]
    request = ChatRequest(messages=messages)
    assert DedupStage().before_model(request) is request


def test_near_duplicate_documents_are_dropped_and_mapped_to_the_kept_id():
    documents = [
        {"id": "a", "text": REPORT},
        {"id": "b", "text": "Completely different: cats and dogs played in the garden all afternoon, chasing "
                            "butterflies and each other until the sun went down behind the hills."},
        {"id": "c", "text": REPORT + " Source: annual filing."},
    ]
    out = DedupStage().before_model(ChatRequest(messages=[{"role": "user", "content": "q"}],
                                                metadata={"documents": documents}))
    assert [d["id"] for d in out.metadata["documents"]] == ["a", "b"]
    assert out.metadata[DUPLICATES_KEY] == {"c": "a"}


def test_minhash_signatures_are_the_same_in_every_instance():
    # Python's hash() is salted per process; the signature must not be, or collapses would differ per worker.
    a, b = MinHasher(), MinHasher()
    assert (a.signature(a.shingles(REPORT)) == b.signature(b.shingles(REPORT))).all()
