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
import uuid
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

    def __init__(self, llama: Any, *, control_text_parsed: bool = False) -> None:
        """control_text_parsed: whether whoever tokenizes the rendered prompt reads control-token text in a
        message (a user's "<|im_end|>") as the control token. LlamaCppBackend does not (ctxkit tokenizes, and
        keeps such text plain); a server that renders the template itself does (llama-cpp-python's server and
        llama-server tokenize the whole rendered prompt with control tokens parsed), and counting it as plain
        text there counted 5 tokens for each such control token the server saw as one."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama = llama
        self.control_text_parsed = control_text_parsed
        self._lock = threading.Lock()  # llama.cpp's tokenizer is not documented as thread-safe
        self._closed = False  # the model was freed (LlamaCppBackend.close): tokenizing with it would crash
        template = llama.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        model = llama._model  # the public API exposes token texts only through the model handle
        eos = model.token_get_text(llama.token_eos()) if llama.token_eos() >= 0 else ""
        bos = model.token_get_text(llama.token_bos()) if llama.token_bos() >= 0 else ""
        self.native_tools = "tools" in template
        # The texts of the vocabulary's control tokens (<|im_start|>, <|im_end|>, ...). Only the chat template
        # may write them: in a message's text (a user's, a retrieved document's, a tool result's) they are
        # plain characters, or that text could close its message and open a system turn of its own.
        self._specials = _special_texts(llama)
        self._special_re = (re.compile("|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True)))
                            if self._specials else None)
        self._nonce = uuid.uuid4().hex[:12]
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self.stop = [eos] if eos else []
        # The context the model was trained for (`<arch>.context_length`); None when the GGUF does not say.
        arch = llama.metadata.get("general.architecture", "")
        length = str(llama.metadata.get(f"{arch}.context_length", ""))
        self.context_length: int | None = int(length) if length.isdigit() else None

    @classmethod
    def from_gguf(cls, path: str | Path, *, control_text_parsed: bool = True) -> GGUFPrompt:
        """A prompt renderer (and token counter) from a GGUF file's vocabulary alone, without its weights: the
        counter for a server that serves that GGUF, which parses control-token text in messages (see __init__)."""
        Llama = import_llama()

        if not Path(path).is_file():
            raise ConfigurationError(f"GGUF file not found: {path}")
        try:
            llama = Llama(model_path=str(path), vocab_only=True, verbose=False)
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file" (not a GGUF, truncated)
            raise ConfigurationError(f"cannot load the GGUF file {path}: {exc}") from None
        return cls(llama, control_text_parsed=control_text_parsed)

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> str:
        formatter: Any = self.formatter  # llama-cpp-python types messages as TypedDicts; ours are plain dicts
        if self.native_tools:
            result = formatter(messages=list(messages), tools=list(tools) or None)
        else:
            result = formatter(messages=messages_for_plain_template(list(messages), list(tools)))
        return result.prompt

    def after_fork_in_child(self) -> None:
        """A count another thread of the parent was making at the fork held the lock: held for ever here."""
        self._lock = threading.Lock()

    def close(self) -> None:
        """No more counting: the model is about to be freed (its tokenizer with it)."""
        with self._lock:
            self._closed = True

    def _tokenizer(self) -> Any:
        """The model, under the lock, while it is not freed: llama.cpp's tokenizer on a freed model is a SIGSEGV."""
        if self._closed:
            from ..errors import BackendError

            raise BackendError("this backend was closed (before or during the call); make a new LlamaCppBackend",
                               backend="llama.cpp")
        return self._llama

    def tokenize(self, text: str) -> list[int]:
        # The template writes special tokens (BOS, <|im_start|>) itself, as llama.cpp's own handler assumes.
        with self._lock:
            return self._tokenizer().tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def tokens(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> list[int]:
        # Control-token text anywhere in a message (a string content, a content part, a tool call's arguments,
        # a name) or a tool schema is the caller's text, not the template's: each occurrence is replaced by a
        # marker (ASCII letters, which survive the template's JSON and HTML escaping), the prompt rendered, and
        # the text around the template's own control tokens tokenized as plain text, each marker as the
        # characters it stands for.
        if self.control_text_parsed:  # the server's own tokenization: every control-token text is the token
            return self.tokenize(self.render(messages, tools))
        found: dict[str, str] = {}
        marked_messages = self._escape(list(messages), found)
        marked_tools = self._escape(list(tools), found)
        if not found:
            return self.tokenize(self.render(messages, tools))
        prompt = self.render(marked_messages, marked_tools)
        # The template's own control tokens are the only ones left in the rendered prompt: split there (as
        # llama.cpp's tokenizer does first), and tokenize each run of text between them in one piece, its
        # markers back to the caller's text, as plain text. Splitting at each marker instead cut the caller's
        # text where BPE would have merged it (more tokens than the text has) and took a call per occurrence.
        assert self._special_re is not None  # found is empty without control-token texts
        restore = re.compile("|".join(re.escape(m) for m in found))
        ids: list[int] = []
        with self._lock:
            pos = 0
            for match in [*self._special_re.finditer(prompt), None]:
                end = match.start() if match is not None else len(prompt)
                text = restore.sub(lambda m: found[m.group()], prompt[pos:end])
                if text:
                    ids += self._tokenizer().tokenize(text.encode("utf-8"), add_bos=False, special=False)
                if match is not None:
                    ids += self._tokenizer().tokenize(match.group().encode("utf-8"), add_bos=False, special=True)
                    pos = match.end()
        return ids

    def _escape(self, value: Any, found: dict[str, str]) -> Any:
        """`value` with each control-token text in its strings replaced by a marker (noted in `found`); the
        same object when it holds none."""
        if isinstance(value, str):
            if self._special_re is None or not self._special_re.search(value):
                return value

            def marker(match: re.Match[str]) -> str:
                text = f"ctxkit{self._nonce}s{self._specials.index(match.group())}e"
                found[text] = match.group()
                return text
            return self._special_re.sub(marker, value)
        if isinstance(value, dict):
            entries = {k: self._escape(v, found) for k, v in value.items()}
            return entries if any(entries[k] is not value[k] for k in entries) else value
        if isinstance(value, (list, tuple)):
            items = [self._escape(v, found) for v in value]
            return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
        return value

    # TokenCounter protocol
    def count_text(self, text: str) -> int:
        # Text counted on its own is a message's (a document, a summary, a section): counted as its control-token
        # texts are tokenized in the prompt (see tokens()).
        return self._count(text, special=self.control_text_parsed)

    def _count(self, text: str, *, special: bool) -> int:
        with self._lock:
            return len(self._tokenizer().tokenize(text.encode("utf-8"), add_bos=False, special=special))

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
        # An answer's text is decoded from the tokens generated, and a control token decodes to nothing: any
        # control-token text in it was generated as plain characters, whoever tokenizes prompts.
        return self._count(text, special=False)


def import_llama() -> Any:
    """llama-cpp-python's `Llama`, or a ConfigurationError naming the extra that brings it (without one, `ctxkit
    demo` died on a ModuleNotFoundError traceback instead of its one `ctxkit: error:` line)."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != "llama_cpp":
            raise  # installed, but something it imports is broken: its own error says what
        raise ConfigurationError(f"a GGUF model (LlamaCppBackend, GGUFPrompt) needs llama-cpp-python "
                                 f"({exc.name or 'llama_cpp'} is missing): pip install 'ctxkit[local]'") from None
    return Llama


def _special_texts(llama: Any) -> tuple[str, ...]:
    import llama_cpp

    model = llama._model
    vocab = model.vocab
    user_defined = getattr(llama_cpp, "LLAMA_TOKEN_ATTR_USER_DEFINED", 0)
    texts = {model.token_get_text(i) for i in range(llama.n_vocab())
             if llama_cpp.llama_vocab_is_control(vocab, i) or llama_cpp.llama_vocab_get_attr(vocab, i) & user_defined}
    return tuple(sorted(t for t in texts if t))
