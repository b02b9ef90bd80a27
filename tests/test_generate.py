import pytest

from fedrouter.core.generate import generate
from fedrouter.core.model import load_base


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(str(tiny_model_dir))


def _prompts(tok):
    texts = [
        "emma lives in paris . who is the baker ? it is",
        "ben",
        "on monday hugo went to the park with iris . on",
        "the council in rome is",
    ]
    return [[tok.bos_token_id, *ids] for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def test_batched_generation_matches_one_by_one_in_input_order(base):
    model, tok = base
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) == 4  # four different lengths: sorting reorders them
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert len(batched) == 4
    assert batched == single
    # also with batches that split the sorted order
    assert generate(model, tok, prompts, max_new_tokens=6, batch_size=3) == single
    # all outputs are strings; not every prompt gets the same completion
    assert all(isinstance(s, str) for s in batched)
    assert len(set(batched)) > 1


def test_adapter_names_must_match_prompts(base):
    model, tok = base
    with pytest.raises(ValueError):
        generate(model, tok, [[1, 2], [1, 3]], max_new_tokens=2, adapter_names=["a"])


# ------------------------------------------------------------------ per-row requests (generate_rows)

@pytest.fixture(scope="module")
def two_adapters(base):
    """The tiny base with two different random LoRA adapters, "left" and "right"."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    model, tok = base
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                adapter_name="left")
    peft_model.add_adapter("right", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.eval()
    return peft_model, tok


def test_rows_with_their_own_budget_stop_and_stream(base):
    from fedrouter.core.generate import Row, generate_rows

    model, tok = base
    prompts = _prompts(tok)
    full = generate(model, tok, prompts, max_new_tokens=8)
    pieces = {k: [] for k in range(4)}
    done = {}
    rows = [Row(p, max_new_tokens=2 + k, on_text=pieces[k].append, on_done=lambda c, k=k: done.setdefault(k, c))
            for k, p in enumerate(prompts)]
    out = generate_rows(model, tok, rows, batch_size=4)
    for k, c in enumerate(out):
        assert c.text == generate(model, tok, [prompts[k]], max_new_tokens=2 + k)[0]  # the same as that budget alone
        assert c.finish_reason in ("stop", "length") and 1 <= c.completion_tokens <= 2 + k
        assert "".join(pieces[k]) == c.text and done[k] is c  # streamed pieces add up; told once, when done
    # a stop string cuts the answer before it
    k, answer = next((k, a) for k, a in enumerate(full) if len(a.split()) >= 2)
    stop = " " + answer.split()[1]
    cut = generate_rows(model, tok, [Row(prompts[k], 8, stop=(stop,))])[0]
    assert cut.text == answer[: answer.index(stop)] and cut.finish_reason == "stop"


def test_greedy_rows_are_unchanged_by_sampled_rows_and_a_seed_repeats(base):
    from fedrouter.core.generate import Row, generate_rows

    model, tok = base
    prompts = _prompts(tok)
    greedy = generate(model, tok, prompts, max_new_tokens=6)
    rows = [Row(p, 6, temperature=1.5 if k % 2 else 0.0, seed=k) for k, p in enumerate(prompts)]
    first, again = generate_rows(model, tok, rows), generate_rows(model, tok, rows)
    assert [c.text for c in first[::2]] == greedy[::2]
    assert [c.text for c in first] == [c.text for c in again]  # seeded rows draw the same
    top = generate_rows(model, tok, [Row(p, 6, temperature=1.0, top_p=1e-6, seed=3) for p in prompts])
    assert [c.text for c in top] == greedy  # a vanishing nucleus is the argmax


def _raise(piece):
    raise RuntimeError("the client's stream broke")


# issue 32: what one row brings fails that row alone; before, one such row failed its whole batch
POISON = {
    "seed torch cannot take": dict(temperature=1.0, seed=10**30),
    "temperature that divides into infinities": dict(temperature=1e-300, seed=1),
    "top_p below float32": dict(temperature=1.0, top_p=1e-300, seed=1),  # kept the top token: not a failure
    "callback that raises": dict(on_text=_raise),
}


@pytest.mark.parametrize("case", sorted(POISON))
def test_a_row_that_fails_fails_alone_and_its_batch_completes(base, case):
    from fedrouter.core.generate import Row, generate_rows

    model, tok = base
    prompts = _prompts(tok)
    greedy = generate(model, tok, prompts, max_new_tokens=6)
    told = {}
    rows = [Row(p, 6, on_done=lambda c, k=k: told.setdefault(k, c)) for k, p in enumerate(prompts)]
    rows[1] = Row(prompts[1], 6, on_done=lambda c: told.setdefault(1, c), **POISON[case])
    out = generate_rows(model, tok, rows, batch_size=4)
    assert [c.text for k, c in enumerate(out) if k != 1] == [g for k, g in enumerate(greedy) if k != 1]
    assert all(told[k] is out[k] for k in range(4))  # every row told once, the failed one too
    if case == "top_p below float32":
        assert out[1].finish_reason != "error" and out[1].text == greedy[1]  # the nucleus is the top token
    else:
        assert out[1].finish_reason == "error" and out[1].error and out[1].text == ""


def test_stacked_adapters_equal_peft_mixed_batch_and_each_adapter_alone(two_adapters):
    from fedrouter.core import mixed_lora
    from fedrouter.core.generate import Row, generate_rows

    model, tok = two_adapters
    prompts = _prompts(tok) * 2
    names = ["left", "right", "right", "left", "__base__", "left", "right", "right"]
    assert mixed_lora.can_stack(model, names)
    stacked = [c.text for c in generate_rows(model, tok, [Row(p, 6, n) for p, n in zip(prompts, names)])]
    peft = [c.text for c in generate_rows(model, tok, [Row(p, 6, n) for p, n in zip(prompts, names)], stack_adapters=False)]
    assert stacked == peft
    alone = {}
    for name in ("left", "right"):
        model.set_adapter(name)
        alone[name] = generate(model, tok, prompts, max_new_tokens=6)
    with model.disable_adapter():
        alone["__base__"] = generate(model, tok, prompts, max_new_tokens=6)
    assert stacked == [alone[n][i] for i, n in enumerate(names)]
    assert alone["left"] != alone["right"]  # the adapters really differ
    with pytest.raises(ValueError, match="no such adapter"):
        generate(model, tok, prompts[:2], max_new_tokens=2, adapter_names=["left", "zz"])
    model.train()
    assert not mixed_lora.can_stack(model, names)  # training mode: peft's own path (which refuses it)
    model.eval()


def test_visible_text_holds_back_what_may_still_change():
    from fedrouter.core.generate import visible_text

    assert visible_text(" hello world ", (), final=True) == ("hello world", False)
    assert visible_text(" hello wor", ("world",), final=False) == ("hello", False)  # "wor" may start the stop string
    assert visible_text(" hello world and more", ("world",), final=False) == ("hello", True)
    assert visible_text(" hello ", (), final=False) == ("hello", False)  # trailing space held back
