"""The one sentence splitter every stage uses (facts, document pruning, dedup, template and summary budgets)."""

from __future__ import annotations

import pytest

from ctxkit.sentences import leading_sentences, sentence_spans, split_sentences


def test_sentences_end_at_stops_and_line_breaks_but_not_after_abbreviations():
    text = ('The U.S. team met Dr. Ruiz and W. B. Yeats at 5 p.m. on Jan. 4. "Is that all?" she asked.\n'
            "- first item\n- second item\n\nA new paragraph!")
    assert split_sentences(text) == [
        "The U.S. team met Dr. Ruiz and W. B. Yeats at 5 p.m. on Jan. 4.", '"Is that all?"', "she asked.",
        "- first item", "- second item", "A new paragraph!"]


@pytest.mark.parametrize(("text", "expected"), [
    ("J. K. Rowling wrote it. Then she rested.", ["J. K. Rowling wrote it.", "Then she rested."]),
    ("He met Franklin D. Roosevelt there. Ok.", ["He met Franklin D. Roosevelt there.", "Ok."]),
    ("The heat capacity is 1.5 J/K. Lastly, the date.", ["The heat capacity is 1.5 J/K.", "Lastly, the date."]),
    ("Take vitamin C. It helps.", ["Take vitamin C.", "It helps."]),
    ("Sue Apple Inc.' in California. Then fly.", ["Sue Apple Inc.' in California.", "Then fly."]),
])
def test_an_initial_follows_a_name_or_precedes_an_initial_a_unit_letter_ends_a_sentence(text, expected):
    assert split_sentences(text) == expected


def test_spans_index_the_original_text_and_blank_text_has_none():
    text = "  One.  Two!\n\nThree?  "
    assert [text[a:b] for a, b in sentence_spans(text)] == ["One.", "Two!", "Three?"]
    assert sentence_spans("   \n ") == []
    assert split_sentences("no sentence end here") == ["no sentence end here"]


def test_leading_sentences_keep_whole_sentences_and_the_text_between_them(llama_backend):
    counter = llama_backend.counter
    text = "Alice booked the 9:40 train.\nBob paid the hotel in Lyon. Carol will bring the maps tomorrow."
    two = counter.count_text("Alice booked the 9:40 train.\nBob paid the hotel in Lyon.")
    assert leading_sentences(text, two, counter) == "Alice booked the 9:40 train.\nBob paid the hotel in Lyon."
    assert leading_sentences(text, two - 1, counter) == "Alice booked the 9:40 train."
    assert leading_sentences(text, counter.count_text(text), counter) == text
    assert leading_sentences(text, 2, counter) == ""
    assert leading_sentences(text, 0, counter) == ""


def test_a_run_of_chinese_or_japanese_sentence_ends_is_one_end():
    """'真的吗？！' split after its '？', leaving '！' a sentence of its own (a junk fact, a cut memory)."""
    assert split_sentences("真的吗？！太好了。什么！！！你确定吗？？我不信。") == [
        "真的吗？！", "太好了。", "什么！！！", "你确定吗？？", "我不信。"]
    assert split_sentences("他说：“你好！”然后走了。") == ["他说：“你好！”", "然后走了。"]


def test_hindi_and_arabic_full_stops_end_sentences():
    assert split_sentences("यह पहला वाक्य है। यह दूसरा वाक्य है।") == ["यह पहला वाक्य है।", "यह दूसरा वाक्य है।"]
    assert split_sentences("هل أنت بخير؟ نعم أنا بخير.") == ["هل أنت بخير؟", "نعم أنا بخير."]
