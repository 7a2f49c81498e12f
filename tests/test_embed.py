"""The Embedder's direct forward pass gives what sentence-transformers' encode() gives, on the real MiniLM."""

from __future__ import annotations

import numpy as np

from ctxkit.embed import _is_mean_pooled_and_normalized

TEXTS = ["  padded on both sides  ", "", "naïve café, 東京 and emoji 🙂", "word " * 600, "tabs\tand\nnewlines",
         "short", "a somewhat longer sentence about the weather in Paris next week", "Is the refund processed?"]


def test_direct_forward_matches_encode_in_any_batch_order(embedder):
    assert embedder._direct, "all-MiniLM-L6-v2 is a mean-pooled, normalized model: the direct path must be used"
    reference = np.asarray(embedder._model.encode(TEXTS, batch_size=4, normalize_embeddings=True,
                                                  convert_to_numpy=True, show_progress_bar=False))
    together = embedder.embed(TEXTS)
    one_by_one = np.stack([embedder.embed([t])[0] for t in TEXTS])
    assert together.dtype == np.float32 and together.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(together, reference, atol=1e-5)
    np.testing.assert_allclose(one_by_one, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_only_a_transformer_mean_pooled_and_normalized_takes_the_direct_path(embedder):
    model = embedder._model
    assert _is_mean_pooled_and_normalized(model)
    assert not _is_mean_pooled_and_normalized([model[0], model[1]]), "without Normalize, encode() decides"
    assert not _is_mean_pooled_and_normalized([model[0], model[2], model[1]])
    assert not _is_mean_pooled_and_normalized(object())
