"""LoRA on the tiny base: state round trips, zero-initialised B, PEFT files, training touches LoRA only."""

import pytest
import torch

from fedrouter.core import synthetic
from fedrouter.core.model import (
    LoraSettings,
    adapter_parameters,
    attach_lora,
    get_adapter_state,
    load_base,
    set_adapter_state,
)
from fedrouter.core.train import batch_stream, encode_examples, train_steps
from fedrouter.errors import FedrouterError

SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture
def base(tiny_model_dir):
    return load_base(str(tiny_model_dir))


@pytest.fixture
def lora_model(base):
    model, tok = base
    torch.manual_seed(0)
    return attach_lora(model, SETTINGS), tok


def _random_state(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in state.items()}


def _input(tok):
    ids = tok(["emma lives in paris . who is the baker ?"], add_special_tokens=False)["input_ids"][0]
    return torch.tensor([[tok.bos_token_id, *ids]])


def test_load_base_returns_frozen_model_and_tokenizer(base):
    model, tok = base
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.bos_token_id is not None
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    ids = tok(["anna lives in rome ."], add_special_tokens=False)["input_ids"][0]
    assert tok.decode(ids) == "anna lives in rome ."
    logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))


def test_load_base_bad_path(tmp_path):
    with pytest.raises(FedrouterError, match="cannot load model"):
        load_base(str(tmp_path / "no-model-here"))


def test_adapter_state_keys_and_shapes(lora_model):
    model, _ = lora_model
    state = get_adapter_state(model)
    # 2 layers x (q_proj, v_proj) x (A, B)
    assert len(state) == 8
    assert all(".default." not in k for k in state)
    for k, v in state.items():
        assert v.dtype == torch.float32
        if "lora_A" in k:
            assert v.shape == (4, 128)
        else:
            assert "lora_B" in k and v.shape == (128, 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(trainable) == 8


def test_lora_b_is_zero_and_logits_equal_base_at_init(base):
    model, tok = base
    x = _input(tok)
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
    torch.manual_seed(0)
    peft_model = attach_lora(model, SETTINGS)
    state = get_adapter_state(peft_model)
    for k, v in state.items():
        if "lora_B" in k:
            assert torch.count_nonzero(v) == 0
        else:
            assert torch.count_nonzero(v) > 0  # A is random: the adapter is not trivially zero
    with torch.no_grad():
        after = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            disabled = peft_model(input_ids=x).logits
    assert torch.allclose(after, before, rtol=0, atol=1e-6)
    assert torch.equal(disabled, before)


def test_get_set_round_trip_exact(lora_model):
    model, tok = lora_model
    init = get_adapter_state(model)
    new = _random_state(init, seed=1)
    set_adapter_state(model, new)
    got = get_adapter_state(model)
    assert set(got) == set(new)
    for k in new:
        assert torch.equal(got[k], new[k])
    # get returns a copy: changing it does not change the model
    next(iter(got.values())).add_(1.0)
    for k, v in get_adapter_state(model).items():
        assert torch.equal(v, new[k])
    # a nonzero B changes the output; restoring the initial adapter restores it
    x = _input(tok)
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        set_adapter_state(model, init)
        restored = model(input_ids=x).logits
        with model.disable_adapter():
            plain = model(input_ids=x).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)
    assert torch.allclose(restored, plain, rtol=0, atol=1e-6)


def test_set_adapter_state_rejects_missing_extra_and_shape(lora_model):
    model, _ = lora_model
    state = get_adapter_state(model)
    key = sorted(state)[0]
    before = get_adapter_state(model)

    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError):
        set_adapter_state(model, missing)

    with pytest.raises(ValueError):
        set_adapter_state(model, {**state, "extra.lora_A.weight": torch.zeros(1)})

    bad = dict(state)
    bad[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    with pytest.raises(ValueError):
        set_adapter_state(model, bad)

    for k, v in get_adapter_state(model).items():
        assert torch.equal(v, before[k])


def test_saved_adapter_loads_with_peft(lora_model, tiny_model_dir, tmp_path):
    from peft import PeftModel

    model, tok = lora_model
    state = _random_state(get_adapter_state(model), seed=2)
    set_adapter_state(model, state)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh, _ = load_base(str(tiny_model_dir))
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    got = get_adapter_state(loaded)
    assert set(got) == set(state)
    for k in state:
        assert torch.equal(got[k], state[k])
    x = _input(tok)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


def test_training_changes_only_lora_parameters(lora_model):
    model, tok = lora_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(adapter_parameters(model).values())
    examples = synthetic.generate_examples("headline", 4, seed="unit")
    stream = batch_stream(encode_examples(tok, examples, max_len=64), 2, tok.pad_token_id, torch.Generator().manual_seed(0))
    stats = train_steps(model, params, stream, steps=2, lr=1e-2, weight_decay=0.1)
    assert stats.steps == 2
    assert stats.tokens > 0 and stats.loss > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora_names = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert changed  # something trained
    assert changed <= lora_names
    assert any("lora_B" in n for n in changed)
    assert not model.training  # back in eval mode


def test_tiny_base_build_is_deterministic(tmp_path):
    """Same spec, two builds in two caches: identical tokenizer and identical weights."""
    from safetensors.torch import load_file

    from fedrouter.core.model import TinyBaseSpec, ensure_tiny_base

    small = dict(hidden_size=32, intermediate_size=64, num_heads=2, pretrain_documents=300)
    spec = TinyBaseSpec(pretrain_steps=3, **small)
    first = ensure_tiny_base(spec, tmp_path / "a", progress=False)
    second = ensure_tiny_base(spec, tmp_path / "b", progress=False)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # a different recipe is a different cache entry, not a silent reuse
    assert ensure_tiny_base(TinyBaseSpec(pretrain_steps=4, **small), tmp_path / "a", progress=False) != first


def test_adapter_fingerprint_tracks_exact_weights():
    from fedrouter.core.workbench import adapter_fingerprint

    a = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}
    same = {k: v.clone() for k, v in a.items()}
    nudged = {**same, "x.lora_B.weight": torch.zeros(3, 2).index_fill_(0, torch.tensor([1]), 1e-7)}
    assert adapter_fingerprint(a) == adapter_fingerprint(same)
    assert adapter_fingerprint(a) != adapter_fingerprint(nudged)
    assert adapter_fingerprint(None) == "base"
