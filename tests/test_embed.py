"""The Embedder's direct forward pass gives what sentence-transformers' encode() gives, on the real MiniLM,
in float32 exactly and in bfloat16 to within cosine 0.9998."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ctxkit.embed import Embedder, _is_mean_pooled_and_normalized, _resolve_precision
from ctxkit.errors import ConfigurationError

from .forks import exit_code_in_fork

TEXTS = ["  padded on both sides  ", "", "naïve café, 東京 and emoji 🙂", "word " * 600, "tabs\tand\nnewlines",
         "short", "a somewhat longer sentence about the weather in Paris next week", "Is the refund processed?"]


@pytest.fixture(scope="module")
def float32_embedder():
    return Embedder(precision="float32")


def _encode(embedder: Embedder) -> np.ndarray:
    return np.asarray(embedder._model.encode(TEXTS, batch_size=4, normalize_embeddings=True,
                                             convert_to_numpy=True, show_progress_bar=False))


def test_direct_forward_matches_encode_in_any_batch_order(float32_embedder):
    embedder = float32_embedder
    assert embedder._direct, "all-MiniLM-L6-v2 is a mean-pooled, normalized model: the direct path must be used"
    assert embedder.precision == "float32"
    reference = _encode(embedder)
    together = embedder.embed(TEXTS)
    one_by_one = np.stack([embedder.embed([t])[0] for t in TEXTS])
    assert together.dtype == np.float32 and together.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(together, reference, atol=1e-5)
    np.testing.assert_allclose(one_by_one, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_bfloat16_vectors_stay_within_cosine_0_9998_of_float32(float32_embedder):
    embedder = Embedder(precision="bfloat16")
    reference = float32_embedder.embed(TEXTS)
    together = embedder.embed(TEXTS)
    one_by_one = np.stack([embedder.embed([t])[0] for t in TEXTS])
    assert together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    # The long text is where pooling in bfloat16 would show (cosine 0.996); it is pooled in float32.
    assert (together * reference).sum(axis=1).min() > 0.9998
    assert (one_by_one * reference).sum(axis=1).min() > 0.9998
    # Same neighbours: the order of similarities to a query does not change.
    query = float32_embedder.embed(["what is the weather in Paris"])[0]
    assert np.argsort(-(reference @ query)).tolist() == np.argsort(-(together @ query)).tolist()


def test_precision_is_checked_and_auto_stays_float32_where_bfloat16_is_not_safe():
    with pytest.raises(ConfigurationError, match="precision must be one of"):
        Embedder(precision="float16")
    with pytest.raises(ConfigurationError, match="mean-pooled"):
        _resolve_precision("bfloat16", "cpu", direct=False)
    assert _resolve_precision("auto", "cpu", direct=False) == "float32"
    assert _resolve_precision("auto", "cuda", direct=True) == "float32"
    assert _resolve_precision("float32", "cpu", direct=True) == "float32"


def test_only_a_transformer_mean_pooled_and_normalized_takes_the_direct_path(embedder):
    model = embedder._model
    assert _is_mean_pooled_and_normalized(model)
    assert not _is_mean_pooled_and_normalized([model[0], model[1]]), "without Normalize, encode() decides"
    assert not _is_mean_pooled_and_normalized([model[0], model[2], model[1]])
    assert not _is_mean_pooled_and_normalized(object())



def test_an_embedder_without_its_extra_names_the_extra(monkeypatch):
    """Without the `embed` extra the Embedder (built by default_stages, so by `ctxkit demo` and `ctxkit serve`)
    raised a bare ModuleNotFoundError, and the CLI printed a traceback with exit 1."""
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # `import sentence_transformers` fails
    with pytest.raises(ConfigurationError,
                       match=r"\(sentence_transformers is missing\): pip install 'ctxkit\[embed\]'"):
        Embedder()


def test_an_installed_extra_whose_own_dependency_is_broken_keeps_its_error(monkeypatch):
    """Only a missing sentence-transformers or torch is 'pip install ctxkit[embed]': a broken library they import
    (a CUDA build's missing libcudart) keeps its own ImportError, which says what to fix."""
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "sentence_transformers":
            raise ImportError("libcudart.so.12: cannot open shared object file", name="torch_cuda_backend")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ImportError, match="libcudart") as info:
        Embedder()
    assert not isinstance(info.value, ConfigurationError)


def test_batches_are_padded_to_a_few_shapes(float32_embedder):
    """Torch keeps memory for each input shape it has run: with every length from 1 to 256 tokens a shape of its
    own, a long-running process grew without end (516 -> 848 MB over 120 lookups of random lengths). Batches are
    padded to a multiple of PAD_MULTIPLE tokens, and the padding changes no vector."""
    from ctxkit.embed import PAD_MULTIPLE

    lengths = []
    model = float32_embedder._model[0].auto_model
    hook = model.register_forward_pre_hook(lambda _m, _a, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        texts = ["word " * n for n in (1, 5, 17, 40, 90, 300)]
        vectors = float32_embedder.embed(texts)
    finally:
        hook.remove()
    assert lengths and all(n % PAD_MULTIPLE == 0 for n in lengths), lengths
    reference = float32_embedder._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(vectors, reference, atol=1e-5)


def _embed_in_fork(embedder: Embedder) -> None:
    import os

    vectors = embedder.embed(["hello world " * 20] * 16)
    os._exit(0 if vectors.shape == (16, 384) else 3)


@pytest.mark.timeout(120)
def test_a_child_forked_after_an_embedding_can_embed(embedder):
    """gunicorn --preload with a warm-up, or multiprocessing's fork: once the parent embedded on several threads,
    a forked child's first embedding hung for ever in torch's OpenMP threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default is every core; the tests' OMP_NUM_THREADS=1 would hide the hang
    try:
        embedder.embed(["warm up the thread pool " * 20] * 16)
        assert exit_code_in_fork(_embed_in_fork, embedder) == 0
        assert torch.get_num_threads() == 2  # the parent keeps its threads
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(120)
def test_a_child_forked_after_the_embedder_was_made_can_embed():
    """gunicorn --preload without a warm-up: loading the model runs torch's operators on its OpenMP threads, so a
    child forked from a parent that made the Embedder but never embedded hung on its first embedding."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default is every core; the tests' OMP_NUM_THREADS=1 would hide the hang
    try:
        fresh = Embedder()  # made, never used, as a preloading app does
        assert exit_code_in_fork(_embed_in_fork, fresh) == 0
    finally:
        torch.set_num_threads(threads)
