"""Self-correction repair rules (disfluency.py) on sentences written for these tests, in the style of
Disfl-QA rewrites, and the traps that must still miss after the repair: a correction that changes a
detail is a different question."""

from __future__ import annotations

import pytest

from ctxkit.stages.cache.disfluency import correction_zone, repair
from ctxkit.stages.cache.guards import Thresholds, judge


@pytest.mark.parametrize("spoken, meant", [
    # a question word lines up with the last question word before the editing term
    ("Book the hotel in what or no rather which district ?", "Book the hotel in which district?"),
    ("When was the , no , where was the treaty signed ?", "where was the treaty signed?"),
    # "first" / "tell me" after the editing term: the speaker started the question over
    ("Where was no first who was the author of the report ?", "who was the author of the report?"),
    ("What year did the bridge open no no tell me who designed the bridge ?", "who designed the bridge?"),
    # a short repair at the end replaces the words it lines up with and keeps the rest
    ("Article 12 covers what kind of leave no sorry 14 ?", "Article 14 covers what kind of leave?"),
    ("What is the phone number of Smith's office no Jones's ?", "What is the phone number of Jones's office?"),
    ("Which valve can open the outlet pipe , no can close ?", "Which valve can close the outlet pipe?"),
    # the repair names what it replaces: "Ronaldo not Messi"
    ("Which team did Messi leave no sorry Ronaldo not Messi ?", "Which team did Ronaldo leave?"),
    ("Which lab has four rooms of freezers no wait two rooms of freezers not four ?",
     "Which lab has two rooms of freezers?"),
    # "no, the French": a name after a determiner lines up with the last name
    ("How much were the British no the French paying for the land ?", "How much were the French paying for the land?"),
    # two editing words in a row ("wait, no") are a correction even with nothing to line up
    ("The report gives the yearly wait , no , monthly figures ?", "The report gives the monthly figures?"),
    ("What did the survey find or uh better what did the census find ?", "what did the census find?"),
    ("In 1912 , sory make that 1913 , which ship sank ?", "In 1913, which ship sank?"),
    # a one-word repair at the end replaces the earlier word with the same ending
    ("How unprofitable was the first quarter , no , profitable ?", "How profitable was the first quarter?"),
    ("What caused the decreased rates of rainfall or actually I mean increased ?",
     "What caused the increased rates of rainfall?"),
    # hesitations go, the words around them stay
    ("Do you serve tea or uh coffee ?", "Do you serve tea or coffee?"),
    # the same last word: as many words as the repair has, ending there (and the first question's mark goes)
    ("Is it safe to eat raw eggs? No, I mean cooked eggs.", "Is it safe to eat cooked eggs."),
    ("Is it safe to eat raw eggs, no I mean cooked eggs?", "Is it safe to eat cooked eggs?"),
])
def test_repair_lines_the_correction_up_with_what_it_replaces(spoken, meant):
    assert repair(spoken) == meant


@pytest.mark.parametrize("fluent", [
    "Is there no fee for the first transfer?",
    "Which rooms have no windows?",
    "Does Paris have no Starbucks?",
    "Which cities have no trains, and which have no buses?",
    "Is the museum free or is it paid?",
    "Tell me what the weather is like in Oslo",
    "What would you do better next time?",
    "Who won, Spain or France?",
    # everyday words that also edit speech
    "Do I need to say sorry to my manager?",
    "Is there a correction for inflation in this table?",
    "How long can I hold on to my booking?",
    "Which plan is better yet cheaper than Basic?",
    "What does my bad mean?",
    "Is it rude to say sorry in an email?",
])
def test_repair_leaves_determiners_and_alternatives_alone(fluent):
    assert repair(fluent) == fluent


def _hit(cached: str, spoken: str) -> bool:
    """Whether `spoken` may be answered by the answer cached for `cached` (similarity taken as passing)."""
    return judge(repair(spoken), "", cached, "", 0.99, None, Thresholds(), query_raw=spoken) is None


@pytest.mark.parametrize("meant, wrong, spoken", [
    ("Book the hotel in which street?", "Book the hotel in which district?",
     "Book the hotel in which district , no wait , which street ?"),
    ("Article 14 covers what kind of leave?", "Article 12 covers what kind of leave?",
     "Article 12 covers what kind of leave no sorry 14 ?"),
    ("What is the phone number of Jones's office?", "What is the phone number of Smith's office?",
     "What is the phone number of Smith's office no Jones's ?"),
    ("Which team did Ronaldo leave?", "Which team did Messi leave?",
     "Which team did Messi leave no sorry Ronaldo not Messi ?"),
    ("How many floors does the hotel have?", "How many rooms does the hotel have?",
     "How many rooms does the hotel have , no wait , how many floors does it have ?"),
    ("Which valve can close the outlet pipe?", "Which valve can open the outlet pipe?",
     "Which valve can open the outlet pipe , no can close ?"),
    ("How profitable was the first quarter?", "How unprofitable was the first quarter?",
     "How unprofitable was the first quarter , no , profitable ?"),
    ("Is it safe to eat cooked eggs?", "Is it safe to eat raw eggs?",
     "Is it safe to eat raw eggs? No, I mean cooked eggs."),
])
def test_a_correction_hits_what_was_meant_and_misses_what_was_taken_back(meant, wrong, spoken):
    assert _hit(meant, spoken)
    assert not _hit(wrong, spoken)


@pytest.mark.parametrize("cached, spoken", [
    ("Which rooms have windows?", "Which rooms have no windows?"),
    ("Does Paris have Starbucks?", "Does Paris have no Starbucks?"),
    ("Is there a fee for the first transfer?", "Is there no fee for the first transfer?"),
])
def test_a_determiner_no_still_negates(cached, spoken):
    assert not _hit(cached, spoken)


@pytest.mark.parametrize("cached, spoken", [
    ("Which sized cars were the least demanded cars in the crisis?",
     "Which crisis no sized cars were the least demanded cars in the crisis?"),
    ("Which valves release steam from the boiler?", "Which pipes no valves release steam from the boiler?"),
])
def test_a_no_after_a_word_the_other_question_lacks_there_is_a_correction(cached, spoken):
    # the word before "no" ("crisis", "pipes") has no counterpart at that place in the cached question
    assert _hit(cached, spoken)


@pytest.mark.parametrize("cached, spoken", [
    ("Is the pizza with onions?", "Is the pizza with no onions?"),
    ("Which plans charge fees?", "Which plans charge no fees?"),
    ("Which pipes release steam from the boiler?", "Which pipes no valves release steam from the boiler?"),
])
def test_a_no_between_shared_words_or_a_taken_back_word_still_misses(cached, spoken):
    assert not _hit(cached, spoken)


@pytest.mark.parametrize("fluent", [
    "Should I wait for the refund or call the bank?",  # "or" offering a choice, "wait" the verb
    "Can I pay by card or transfer the money later?",
    "Is there a correction notice for this table?",  # "correction" the noun
    "Do I need to say sorry to my manager?",
])
def test_plain_editing_words_open_no_correction_zone(fluent):
    assert correction_zone(fluent) == ""


@pytest.mark.parametrize("fluent", [
    "Give me 3 tips for sleeping better",  # an editing word that ends the question has no repair after it
    "Can I take 2 ibuprofen instead?",
    "Can I drink 3 coffees a day or no?",
    "Should I buy Tesla stock or wait?",
    "How long does it take to boil 2 eggs, wait",
    "Is 2 mg of melatonin actually safe",  # an everyday word no comma sets off, which repair() leaves alone
    "Can I take 2 ibuprofen instead of paracetamol?",
    "Give me 3 tips for sleeping better at night",
    "Can I take 2 ibuprofen rather than paracetamol?",
])
def test_everyday_editing_words_with_no_repair_open_no_correction_zone(fluent):
    assert correction_zone(fluent) == ""


@pytest.mark.parametrize("disfluent, reparandum", [
    # unpunctuated corrections that repair() cannot undo still forgive what they take back (Disfl-QA's own shapes)
    ("Plants have sorry lack what kind of immune cells ?", "have"),
    ("How many individual universities rather libraries make up the main school library ?", "universities"),
    ("What decreased sorry increased in the Rhine because of the land clearance ?", "decreased"),
])
def test_an_unpunctuated_correction_keeps_its_zone(disfluent, reparandum):
    assert reparandum in correction_zone(disfluent).split()


@pytest.mark.parametrize("cached, asked", [
    ("Give me 3 tips for sleeping better", "Give me 5 tips for sleeping better"),
    ("Can I take 2 ibuprofen instead?", "Can I take 4 ibuprofen instead?"),
    ("Is 2 mg of melatonin actually safe", "Is 10 mg of melatonin actually safe"),
    ("Should I buy Tesla stock or wait?", "Should I sell Tesla stock or wait?"),
])
def test_a_detail_before_an_everyday_editing_word_is_not_forgiven(cached, asked):
    # both as the stage compares them: each with its own text as typed (so each side's zone counts)
    assert judge(repair(asked), "", repair(cached), "", 0.99, None, Thresholds(), query_raw=asked,
                 candidate_raw=cached) is not None


def test_a_choice_does_not_hit_one_of_its_options():
    # similarity 0.99 in _hit: the zone alone decides, not the added-detail threshold
    assert not _hit("Should I call the bank?", "Should I wait for the refund or call the bank?")


@pytest.mark.parametrize("spoken, forgiven", [
    ("What is the name of the colony founded in 1882 or maybe 1564 ?", "1882"),  # "or maybe": a hedge
    ("When did or what types of groups avoid the plague ?", "When"),  # "or" restarting the question
    ("Is the Louvre open on Monday , wait , on Tuesday ?", "Monday"),  # "wait" set off by commas
])
def test_editing_words_that_correct_still_open_a_zone(spoken, forgiven):
    assert forgiven in correction_zone(spoken).split()
