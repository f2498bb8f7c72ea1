"""The two text encoders agree where they compute the same thing."""

import numpy as np

from spark_jobs.config import EmbeddingConfig
from spark_jobs.embed import encoder_for


def test_hf_mean_pooling_equals_sentence_transformers_on_minilm():
    # all-MiniLM-L6-v2 as a sentence-transformer is mean pooling over its tokens, then l2-normalisation.
    texts = ["A thriller set in 1970s Paris.", "Cookbook: vegetables", "user likes jazz and long novels about the sea"]
    reference = encoder_for(EmbeddingConfig(encoder="sentence-transformers", batch_size=2, device="cpu"))(texts)
    pooled = encoder_for(EmbeddingConfig(encoder="hf-decoder", pooling="mean", batch_size=2, device="cpu"))(texts)
    pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled, reference, atol=1e-5)
