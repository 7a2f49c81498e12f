"""The exact prompt a GGUF model sees: its own chat template, rendered the way llama.cpp renders it.

The same object renders the prompt that LlamaCppBackend sends and counts the tokens ctxkit reports,
so the local count is llama.cpp's count by construction (a test holds it to the reported usage). It also
serves as the token counter for a remote llama.cpp server or any endpoint serving a GGUF model: load
the GGUF with `vocab_only=True` (no weights) and count.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .tool_format import format_tool_call, messages_for_plain_template

# Used only when a GGUF carries no chat template; ChatML is what most small instruct models expect.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class GGUFPrompt:
    """Renders chat requests with a GGUF's template and tokenizes them with its vocabulary."""

    def __init__(self, llama: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama = llama
        self._lock = threading.Lock()  # llama.cpp's tokenizer is not documented as thread-safe
        template = llama.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        model = llama._model  # the public API exposes token texts only through the model handle
        eos = model.token_get_text(llama.token_eos()) if llama.token_eos() >= 0 else ""
        bos = model.token_get_text(llama.token_bos()) if llama.token_bos() >= 0 else ""
        self.native_tools = "tools" in template
        # The texts of the vocabulary's control tokens (<|im_start|>, <|im_end|>, ...). Only the chat template
        # may write them: in a message's text (a user's, a retrieved document's, a tool result's) they are
        # plain characters, or that text could close its message and open a system turn of its own.
        self._specials = _special_texts(llama)
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self.stop = [eos] if eos else []
        # The context the model was trained for (`<arch>.context_length`); None when the GGUF does not say.
        arch = llama.metadata.get("general.architecture", "")
        length = str(llama.metadata.get(f"{arch}.context_length", ""))
        self.context_length: int | None = int(length) if length.isdigit() else None

    @classmethod
    def from_gguf(cls, path: str | Path) -> GGUFPrompt:
        """A prompt renderer (and token counter) from a GGUF file's vocabulary alone, without its weights."""
        from llama_cpp import Llama

        if not Path(path).is_file():
            raise ConfigurationError(f"GGUF file not found: {path}")
        return cls(Llama(model_path=str(path), vocab_only=True, verbose=False))

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> str:
        formatter: Any = self.formatter  # llama-cpp-python types messages as TypedDicts; ours are plain dicts
        if self.native_tools:
            result = formatter(messages=list(messages), tools=list(tools) or None)
        else:
            result = formatter(messages=messages_for_plain_template(list(messages), list(tools)))
        return result.prompt

    def tokenize(self, text: str) -> list[int]:
        # The template writes special tokens (BOS, <|im_start|>) itself, as llama.cpp's own handler assumes.
        with self._lock:
            return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def tokens(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> list[int]:
        messages = list(messages)
        risky = [i for i, m in enumerate(messages)
                 if isinstance(m.get("content"), str) and any(t in m["content"] for t in self._specials)]
        if not risky:
            return self.tokenize(self.render(messages, tools))
        # Render with a marker in place of each such text, then tokenize the template's own text with its
        # special tokens and the message's text as plain text.
        marked = list(messages)
        markers = {}
        for i in risky:
            marker = f"\ue000ctxkit-{i}\ue001"
            markers[marker] = messages[i]["content"]
            marked[i] = {**messages[i], "content": marker}
        prompt = self.render(marked, tools)
        pieces = re.split("(" + "|".join(re.escape(m) for m in markers) + ")", prompt)
        ids: list[int] = []
        with self._lock:
            for piece in pieces:
                if piece in markers:
                    ids += self._llama.tokenize(markers[piece].encode("utf-8"), add_bos=False, special=False)
                elif piece:
                    ids += self._llama.tokenize(piece.encode("utf-8"), add_bos=False, special=True)
        return ids

    # TokenCounter protocol
    def count_text(self, text: str) -> int:
        return len(self.tokenize(text))

    def count_prompt(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> int:
        return len(self.tokens(messages, tools))

    def count_completion(self, message: dict[str, Any]) -> int:
        text = message.get("content") or ""
        for call in message.get("tool_calls") or []:
            try:
                arguments = json.loads(call["function"]["arguments"] or "{}")
            except json.JSONDecodeError:  # cut off by max_tokens: count what was written
                arguments = call["function"]["arguments"]
            text += format_tool_call(call["function"]["name"], arguments)
        return self.count_text(text)


def _special_texts(llama: Any) -> tuple[str, ...]:
    import llama_cpp

    model = llama._model
    vocab = model.vocab
    user_defined = getattr(llama_cpp, "LLAMA_TOKEN_ATTR_USER_DEFINED", 0)
    texts = {model.token_get_text(i) for i in range(llama.n_vocab())
             if llama_cpp.llama_vocab_is_control(vocab, i) or llama_cpp.llama_vocab_get_attr(vocab, i) & user_defined}
    return tuple(sorted(t for t in texts if t))
