"""DedupStage: later near-duplicates collapse, what differs survives, nothing else is touched."""

from __future__ import annotations

from ctxkit import ChatRequest
from ctxkit.response import message_text
from ctxkit.stages.prefix import default_counter
from ctxkit.stages.pruning import DedupStage, DocumentPruningStage
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
    assert collapsed.startswith(COLLAPSED_PREFIX + ' user message "Read this:')
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
        {"id": "c", "text": REPORT.replace(". ", ".\n")},  # the same sentences, laid out otherwise
    ]
    out = DedupStage().before_model(ChatRequest(messages=[{"role": "user", "content": "q"}],
                                                metadata={"documents": documents}))
    assert [d["id"] for d in out.metadata["documents"]] == ["a", "b"]
    assert out.metadata[DUPLICATES_KEY] == {"c": "a"}


def test_minhash_signatures_are_the_same_in_every_instance():
    # Python's hash() is salted per process; the signature must not be, or collapses would differ per worker.
    a, b = MinHasher(), MinHasher()
    assert (a.signature(a.shingles(REPORT)) == b.signature(b.shingles(REPORT))).all()


def test_a_changed_sign_or_operator_survives_the_collapse():
    # Words alone say "-18" and "18", ">" and ">=", are the same: the fact that changed must still be sent.
    freezer = ("Temperature in the freezer this morning was {t} degrees, the compressor ran for 40 minutes, the door "
               "seal looked fine and the alarm stayed off all night long.")
    messages = [
        {"role": "user", "content": freezer.format(t="-18")},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": freezer.format(t="18")},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Is the freezer working?"},
    ]
    out = DedupStage().before_model(ChatRequest(messages=messages))
    assert "was 18 degrees" in out.messages[2]["content"]


def test_pasted_code_that_changed_one_operator_is_not_collapsed_to_nothing():
    code = ("def in_stock(item, inventory):\n    count = inventory.get(item, 0)\n    if count > 0:\n        return True\n"
            "    for alias in ALIASES.get(item, []):\n        if inventory.get(alias, 0) > 0:\n            return True\n"
            "    return False\n")
    messages = [
        {"role": "user", "content": "Here is my function:\n" + code},
        {"role": "assistant", "content": "Looks fine."},
        {"role": "user", "content": "Here is my function:\n" + code.replace("count > 0", "count >= 0")},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "Why does it return True for empty items now?"},
    ]
    out = DedupStage().before_model(ChatRequest(messages=messages))
    assert "count >= 0" in message_text(out.messages[2])


def test_messages_with_images_are_never_collapsed():
    prompt = ("Please describe this photo in detail: the people, the objects on the table, the colours of the walls, "
              "the lighting, and anything unusual you notice in the background of the picture.")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": prompt},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
        {"role": "assistant", "content": "A kitchen."},
        {"role": "user", "content": [{"type": "text", "text": prompt},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}}]},
        {"role": "assistant", "content": "A garden."},
        {"role": "user", "content": "Which photo was brighter?"},
    ]
    request = ChatRequest(messages=messages)
    assert DedupStage().before_model(request) is request


def test_a_near_duplicate_document_with_a_new_number_keeps_its_id_and_that_sentence():
    policy = ("Refund policy, version {v}. Customers may return unworn items for a full refund within {d} days of "
              "delivery. Items must be in their original packaging with all tags attached. Refunds are issued to "
              "the original payment method within five business days after we receive the parcel.")
    documents = [{"id": "old", "text": policy.format(v="2023", d=30)},
                 {"id": "new", "text": policy.format(v="2025", d=14)}]
    out = DedupStage().before_model(ChatRequest(messages=[{"role": "user", "content": "How long under 2025 rules?"}],
                                                metadata={"documents": documents}))
    new = next(d for d in out.metadata["documents"] if d["id"] == "new")
    assert "within 14 days" in new["text"] and "original packaging" not in new["text"]
    assert "new" not in out.metadata.get(DUPLICATES_KEY, {})


def test_a_collapse_that_saves_nothing_is_not_made():
    # Two cleared results of the same search, pages 1 and 2: "collapsed", the second one grew and no longer
    # started with the placeholder that says which call to repeat.
    from ctxkit.stages.pruning import ToolResultClearingStage
    from ctxkit.stages.pruning.tool_results import PLACEHOLDER_PREFIX

    query = "quarterly revenue growth for Nordic subsidiaries in fiscal year 2024 broken down by product line"
    messages: list[dict] = [{"role": "user", "content": "Research this."}]
    for k in range(4):
        messages.append({"role": "assistant", "content": None, "tool_calls": [{"id": f"c{k}", "type": "function",
                         "function": {"name": "search", "arguments": f'{{"query": "{query}", "page": {k + 1}}}'}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{k}",
                         "content": " ".join(f"result {k}-{i}: lorem ipsum dolor sit amet." for i in range(60))})
    messages += [{"role": "assistant", "content": "Found it."}, {"role": "user", "content": "Summarize page 2."}]
    request = ToolResultClearingStage(keep_last=2, clear_at_least=64).before_model(ChatRequest(messages=messages))
    out = DedupStage().before_model(request)
    assert out.messages[4]["content"].startswith(PLACEHOLDER_PREFIX)
    assert out.messages == request.messages


def test_default_stages_dedup_counts_with_the_backends_counter(llama_backend, embedder):
    # With tiktoken's estimate, min_tokens and the ledger's prefix_invalidated tokens were not the model's.
    from ctxkit.stages import default_stages

    dedup = next(s for s in default_stages(llama_backend, embedder=embedder) if isinstance(s, DedupStage))
    assert dedup.counter is llama_backend.counter


def _repeated(first: str, later: str):
    return [{"role": "user", "content": first}, {"role": "assistant", "content": "Looks fine."},
            {"role": "user", "content": later}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "Which version did I send last, and is it correct?"}]


_CODE = """Here is my function, please review it:
def total(orders):
    s = 0
    for o in orders:
        s += o.amount
        if o.refunded:
            s -= o.amount
    return s
It is called from the billing job every night and from the report page."""


def test_code_that_changed_only_its_indentation_or_case_is_not_called_a_duplicate():
    """`return s` moved into the loop, or o.amount renamed o.Amount: both were collapsed as 100% the same."""
    for change in ("        return s", "s += o.Amount"):
        later = _CODE.replace("    return s", change) if "return" in change else _CODE.replace("s += o.amount", change)
        out = DedupStage().before_model(ChatRequest(messages=_repeated(_CODE, later))).messages
        code = later[later.index("def total"):later.index("It is called")].strip()
        assert code in message_text(out[2]), message_text(out[2])


def test_a_copy_that_drops_a_sentence_says_what_it_lacks():
    rules = ("Deployment checklist for release 4.2, please keep it in mind for the rest of this session.\n"
             "Freeze the main branch before tagging.\nRun the database migration on staging first.\n"
             "Do not deploy on Friday afternoon.\nNotify the support team one hour before the rollout.")
    later = rules.replace("Do not deploy on Friday afternoon.\n", "")
    out = DedupStage().before_model(ChatRequest(messages=_repeated(rules, later))).messages
    sent = message_text(out[2])
    assert sent.startswith(COLLAPSED_PREFIX) and sent.endswith("[not in this copy:] Do not deploy on Friday afternoon.")


def test_two_large_one_line_results_that_differ_in_one_value_collapse_to_that_value():
    """A one-line JSON result is one "sentence": comparing two of 80 KB with difflib took a minute."""
    import json as json_

    items = [{"sku": f"SKU-{i:05d}", "stock": i % 17, "warehouse": "OSL-2"} for i in range(1500)]
    first = json_.dumps(items, separators=(",", ":"))
    items[700]["stock"] = 99
    second = json_.dumps(items, separators=(",", ":"))
    messages = [{"role": "user", "content": "Stock?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function", "function": {
                    "name": "inventory", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "a", "content": first},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "b", "type": "function", "function": {
                    "name": "inventory", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "b", "content": second},
                {"role": "user", "content": "Which item changed?"}]
    out = DedupStage().before_model(ChatRequest(messages=messages)).messages
    assert '"stock":99' in message_text(out[4]), "the one value that changed must reach the model"


def _two_results(first: str, second: str) -> list[dict]:
    def call(cid: str) -> dict:
        return {"id": cid, "type": "function", "function": {"name": "list_payments", "arguments": "{}"}}

    return [{"role": "user", "content": "Did the customer get charged twice?"},
            {"role": "assistant", "content": None, "tool_calls": [call("c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": first},
            {"role": "assistant", "content": None, "tool_calls": [call("c2")]},
            {"role": "tool", "tool_call_id": "c2", "content": second},
            {"role": "assistant", "content": "Let me compare."},
            {"role": "user", "content": "Well?"}]


def test_a_repeated_line_or_a_new_order_is_not_called_the_same():
    """A charge now listed three times, or a queue reversed, was collapsed as "100% same wording": the model
    was told nothing changed, and a double charge disappeared."""
    others = [f"- charge of ${i}0.00 to card ending 1111 succeeded" for i in range(2, 8)]
    charge = "- charge of $120.00 to card ending 4242 succeeded"
    before = "Payments today:\n" + "\n".join([charge, *others])
    after = "Payments today:\n" + "\n".join([charge, charge, charge, *others])
    assert DedupStage().before_model(ChatRequest(messages=_two_results(before, after))).messages[4]["content"] == after
    jobs = ["alice-build", "bob-deploy", "carol-test", "dave-lint", "erin-docs", "frank-bench"]
    line = "- job {} waiting for a runner on the shared pool"
    before = "Build queue, in the order the jobs will run:\n" + "\n".join(line.format(j) for j in jobs)
    after = "Build queue, in the order the jobs will run:\n" + "\n".join(line.format(j) for j in reversed(jobs))
    assert DedupStage().before_model(ChatRequest(messages=_two_results(before, after))).messages[4]["content"] == after
    changed = before.replace("alice-build waiting", "alice-build (attempt 2) waiting")
    collapsed = DedupStage().before_model(ChatRequest(messages=_two_results(before, changed))).messages[4]["content"]
    assert collapsed.startswith(COLLAPSED_PREFIX) and "attempt 2" in collapsed, "a changed item still collapses"


def test_a_collapsed_copy_names_the_earlier_one_so_that_inserted_documents_do_not_shift_it(llama_backend):
    """It said "near-duplicate of message 3"; DocumentPruningStage then put the documents before the newest
    user message, and message 3 was an assistant tool call, not the result it meant."""
    from ctxkit import Pipeline
    from ctxkit.stages.pruning import DocumentPruningStage

    from .recording import Sent

    messages: list[dict] = [{"role": "system", "content": "You are a CI assistant."},
                            {"role": "user", "content": "Why did my build fail?"}]
    for k, build in enumerate(("4411", "4412")):
        messages.append({"role": "assistant", "content": None, "tool_calls": [{"id": f"c{k}", "type": "function",
                         "function": {"name": "ci_log", "arguments": f'{{"build": {build}}}'}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{k}", "content": (
            f"Build {build} failed in stage integration-tests after 14 minutes. The failing test was "
            "test_checkout_flow with a timeout talking to the payments sandbox. Retrying the job did not help and "
            "the same error appeared on the second attempt, which points at the sandbox, not the code under test.")})
    sent = Sent()
    documents = [{"id": "runbook", "text": "If the payments sandbox times out, rerun after it recovers."}]
    stages = [DedupStage(counter=llama_backend.counter),
              DocumentPruningStage(budget_tokens=300, counter=llama_backend.counter, long_message_tokens=None), sent]
    Pipeline(llama_backend, stages).call(ChatRequest(messages=messages, params={"max_tokens": 3},
                                                     metadata={"documents": documents}))
    collapsed = sent.seen[-1].messages[-1]["content"]
    assert collapsed.startswith(COLLAPSED_PREFIX + ' result of ci_log({"build": 4411})'), collapsed
    assert "4412" in collapsed


def test_a_collapsed_copy_names_a_long_call_in_short():
    """The earlier copy was named by its whole call: a 300-character SQL query was sent again in the collapsed
    copy, which saved 178 tokens of 324 instead of 277."""
    import json

    query = "SELECT o.id, c.name, SUM(li.qty * li.price) AS total FROM orders o JOIN customers c ON c.id = " \
            "o.customer_id JOIN line_items li ON li.order_id = o.id WHERE o.status IN ('paid', 'shipped') " \
            "GROUP BY o.id, c.name ORDER BY total DESC LIMIT 20"
    rows = "\n".join(f"{1000 + i} | Customer {i} | c{i}@example.com | {100 + i * 7}.00" for i in range(12))

    def step(i, content):
        call = {"id": f"c{i}", "type": "function", "function": {"name": "run_sql", "arguments": json.dumps({"query": query})}}
        return [{"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"c{i}", "content": content}]

    messages = [{"role": "user", "content": "Top orders?"}, *step(1, rows), {"role": "user", "content": "Again"},
                *step(2, rows + "\n1012 | Customer 12 | c12@example.com | 184.00"), {"role": "user", "content": "New?"}]
    collapsed = DedupStage().before_model(ChatRequest(messages=messages)).messages[5]["content"]
    assert collapsed.startswith(COLLAPSED_PREFIX + ' result of run_sql({"query": "SELECT'), collapsed
    assert query not in collapsed and "1012 | Customer 12" in collapsed


def test_a_sentence_dropped_beside_a_changed_one_is_still_reported_missing():
    """"Ticket 4411 is closed." stood for both "Ticket 4411 is open." and the dropped "Ticket 4412 is open.":
    the collapsed copy told the model only 4411 changed, so it answered that 4412 was still open."""
    common = ("Status report for the payments team. The nightly batch finished at 02:14 without errors. "
              "The fraud model was retrained on Monday and its precision held steady. Disk usage on db-1 is "
              "61 percent. The on-call rotation for next week is Dana then Lee. ")
    early = common + "Ticket 4411 is open. Ticket 4412 is open. Ticket 4413 is open."
    late = common + "Ticket 4411 is closed. Ticket 4413 is open."
    messages = [
        {"role": "user", "content": "status?"},
        {"role": "assistant", "content": early},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": late},
        {"role": "user", "content": "Which tickets are still open?"},
    ]
    sent = DedupStage().before_model(ChatRequest(messages=messages)).messages[3]["content"]
    assert sent.startswith(COLLAPSED_PREFIX)
    assert "Ticket 4411 is closed." in sent and "[not in this copy:] Ticket 4412 is open." in sent


def test_a_document_cut_to_its_own_sentences_names_the_document_holding_the_rest():
    """The US policy was sent as "Refund policy for US customers." alone: nothing said its terms were the EU
    document's, so the model read a policy without terms."""
    body = (" Refunds are issued within 30 days of delivery to the original payment method. Items must be unused"
            " and in their original packaging. Shipping is free on orders over 50 units of local currency. Gift"
            " cards cannot be refunded. Contact support through the help centre to start a return.")
    documents = [{"id": "policy-eu", "text": "Refund policy for EU customers." + body},
                 {"id": "policy-us", "text": "Refund policy for US customers." + body}]
    request = ChatRequest(messages=[{"role": "user", "content": "Can a US customer refund a gift card?"}],
                          metadata={"documents": documents})
    kept = DedupStage().before_model(request).metadata["documents"]
    assert [d["id"] for d in kept] == ["policy-eu", "policy-us"]
    assert '"policy-eu"' in kept[1]["text"] and "Refund policy for US customers." in kept[1]["text"]


def test_copy_with_every_line_changed_is_kept_whole_and_fast():
    # A re-polled log or table with a number changed on every line: "collapsing" it saved nothing (the copy
    # carried every line, flattened onto one, plus a note) and pairing the changed lines took a minute.
    import time

    def log(run: int) -> str:
        return "\n".join(f"worker {i} processed batch {i} of the nightly export job for the finance team in region "
                         f"eu west with latency {run * 7 + i % 13} ms and no errors reported." for i in range(400))

    stage = DedupStage()
    start = time.perf_counter()
    documents, duplicates = stage.collapse_documents([{"id": "mon", "text": log(1)}, {"id": "tue", "text": log(2)}])
    messages = [{"role": "user", "content": "show the log"}, {"role": "assistant", "content": log(1)},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": log(2)},
                {"role": "user", "content": "thanks"}]
    out = stage.before_model(ChatRequest(messages=messages))
    assert time.perf_counter() - start < 10
    assert duplicates == {} and documents[1]["text"] == log(2)
    assert out.messages[3]["content"] == log(2)


def test_changed_rows_of_a_table_stay_one_a_line():
    def rows(changed: set[int]) -> str:
        return "sku,name,price,stock\n" + "\n".join(
            f"{1000 + i},widget model {i} deluxe edition,{19.5 + i},{(7 if i in changed else 80) + i}" for i in range(30))

    documents, _ = DedupStage().collapse_documents([{"id": "mon", "text": rows(set())},
                                                    {"id": "tue", "text": rows({3, 17})}])
    assert documents[1]["text"].startswith(COLLAPSED_PREFIX)
    assert documents[1]["text"].endswith("1003,widget model 3 deluxe edition,22.5,10\n"
                                         "1017,widget model 17 deluxe edition,36.5,24")


COMMON = ("Refunds go to the original card within five business days. Shipping is refunded for defective items only. "
          "Gift cards cannot be refunded. Contact support by email at help@example.com for any refund question. "
          "Items must be unused and in their original packaging. ")
DOCS = [{"id": "policy-eu", "text": "Refund policy. Customers may return items within 30 days. Opened software is final sale. " + COMMON},
        {"id": "policy-us", "text": "Refund policy. Customers may return items within 14 days. " + COMMON}]


def _sent(question: str, budget: int) -> str:
    counter = default_counter()
    request = ChatRequest(messages=[{"role": "user", "content": question}], metadata={"documents": DOCS})
    request = DedupStage(counter=counter).before_model(request)
    assert "[not in this copy:] Opened software is final sale." in request.metadata["documents"][1]["text"]
    out = DocumentPruningStage(budget_tokens=budget, counter=counter).before_model(request)
    return str(out.messages[0]["content"])


def test_a_sentence_the_copy_lacks_keeps_its_marker() -> None:
    for budget in range(8, 40, 2):
        sent = _sent("Is opened software final sale?", budget)
        us = sent.split('<document id="policy-us">')[1] if "policy-us" in sent else ""
        if "Opened software is final sale." in us:
            assert "[not in this copy:] Opened software is final sale." in us, (budget, sent)
        assert not us.strip().rstrip("<>/document \n…").endswith("[not in this copy:]"), (budget, sent)


def test_the_note_is_never_cut_apart() -> None:
    for question in ("Can I return an item after 14 days?", "Is opened software final sale?"):
        for budget in range(8, 40, 2):
            sent = _sent(question, budget)
            assert "… ]" not in sent and "… what differs" not in sent and "… ] " not in sent, (budget, sent)
            if "[near-duplicate" in sent:
                assert '[near-duplicate of the earlier document "policy-eu", collapsed by ctxkit; the rest is the same; what differs:]' in sent


def test_cleared_results_placeholders_are_not_collapsed_as_near_duplicates():
    """Clearing runs before dedup: placeholders of calls with long, alike arguments (a prompt, a query) were
    collapsed as near-duplicates of the first one, cutting the arguments they say to call again with."""
    import json

    from ctxkit.stages.pruning import ToolResultClearingStage

    prompt = ("Summarize the quarterly report for the board. Keep it under two pages. Use plain language and avoid "
              "jargon. Highlight risks, opportunities and the outlook for the next two quarters. Mention the "
              "headcount change. ")
    messages = [{"role": "user", "content": "Draft summaries for the regions."}]
    for i, region in enumerate(["Region: Nordics.", "Region: Benelux.", "Region: Iberia."]):
        messages += [{"role": "assistant", "content": None, "tool_calls": [
                         {"id": f"c{i}", "type": "function", "function": {
                             "name": "llm_summarize", "arguments": json.dumps({"instructions": prompt + region})}}]},
                     {"role": "tool", "tool_call_id": f"c{i}",
                      "content": " ".join(f"Paragraph {p} about {region} sales grew {p * i}%." for p in range(60))}]
    messages += [{"role": "assistant", "content": "done"}, {"role": "user", "content": "Compare Nordics and Benelux."}]
    request = ToolResultClearingStage(keep_last=1, clear_at_least=0).before_model(ChatRequest(messages=messages))
    out = DedupStage().before_model(request)
    assert out.messages[4]["content"] == request.messages[4]["content"]
    assert json.dumps({"instructions": prompt + "Region: Benelux."}) in out.messages[4]["content"]
