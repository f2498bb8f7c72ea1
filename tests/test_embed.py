"""The two text encoders agree where they compute the same thing."""

import numpy as np

from spark_jobs.config import EmbeddingConfig
from spark_jobs.embed import encoder_for, resolve_model


def test_hf_mean_pooling_equals_sentence_transformers_on_minilm():
    # all-MiniLM-L6-v2 as a sentence-transformer is mean pooling over its tokens, then l2-normalisation.
    texts = ["A thriller set in 1970s Paris.", "Cookbook: vegetables", "user likes jazz and long novels about the sea"]
    reference = encoder_for(EmbeddingConfig(encoder="sentence-transformers", batch_size=2, device="cpu"))(texts)
    pooled = encoder_for(EmbeddingConfig(encoder="hf-decoder", pooling="mean", batch_size=2, device="cpu"))(texts)
    pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled, reference, atol=1e-5)


def test_hf_last_pooling_takes_each_texts_last_real_token_in_a_padded_batch():
    """pooling=last on texts of different lengths batched together (right padding): each row is the hidden state
    of that text's own last token, as the model gives it for the text alone (no padding), not a pad token's."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["A thriller set in 1970s Paris.", "Jazz", "user likes jazz and long novels about the sea and old ships"]
    pooled = encoder_for(EmbeddingConfig(encoder="hf-decoder", pooling="last", batch_size=3, device="cpu"))(texts)
    path = resolve_model(EmbeddingConfig().model)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        alone = np.stack([model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, -1].numpy() for text in texts])
    np.testing.assert_allclose(pooled, alone, atol=1e-4)
