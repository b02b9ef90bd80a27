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
