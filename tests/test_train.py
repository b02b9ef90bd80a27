import math
from itertools import islice

import pytest
import torch

from fedrouter.core.train import IGNORE, EncodedExample, batch_stream, collate, encode_examples, round_lr

BOS, EOS, PAD = 1, 2, 0


class WordTokenizer:
    """A whitespace tokenizer with a growing vocabulary: ids are predictable by hand."""

    def __init__(self, bos=BOS, eos=EOS):
        self.bos_token_id, self.eos_token_id = bos, eos
        self.vocab: dict[str, int] = {}

    def id(self, word: str) -> int:
        return self.vocab.setdefault(word, 10 + len(self.vocab))

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[self.id(w) for w in t.split()] for t in texts]}


def test_encode_bos_first_eos_last():
    tok = WordTokenizer()
    enc = encode_examples(tok, [{"instruction": "hello world", "output": "bye", "task": "t"}],
                          template="{instruction}\nanswer :", max_len=64)
    assert len(enc) == 1
    e = enc[0]
    ids = tok.vocab
    assert e.prompt_ids == [BOS, ids["hello"], ids["world"], ids["answer"], ids[":"]]
    assert e.answer_ids == [ids["bye"], EOS]
    assert e.task == "t"


def test_encode_keeps_order_and_tasks():
    tok = WordTokenizer()
    examples = [{"instruction": f"q{i}", "output": f"a{i} z", "task": f"t{i}"} for i in range(3)]
    enc = encode_examples(tok, examples, template="{instruction}", max_len=64)
    for i, e in enumerate(enc):
        assert e.prompt_ids == [BOS, tok.vocab[f"q{i}"]]
        assert e.answer_ids == [tok.vocab[f"a{i}"], tok.vocab["z"], EOS]
        assert e.task == f"t{i}"


def test_encode_without_bos_token():
    tok = WordTokenizer(bos=None)
    e = encode_examples(tok, [{"instruction": "x", "output": "y", "task": "t"}], template="{instruction}")[0]
    assert e.prompt_ids == [tok.vocab["x"]]
    assert e.answer_ids == [tok.vocab["y"], EOS]


def test_encode_truncates_prompt_start_and_long_answers():
    tok = WordTokenizer()
    words = [f"w{i}" for i in range(1, 11)]
    e = encode_examples(tok, [{"instruction": " ".join(words), "output": "c", "task": "t"}],
                        template="{instruction} answer :", max_len=8)[0]
    # answer [c, EOS] (2 tokens) leaves 8 - 2 - 1 (BOS) = 5 prompt tokens: the prompt's END is kept
    assert e.answer_ids == [tok.vocab["c"], EOS]
    assert e.prompt_ids == [BOS] + [tok.vocab[w] for w in ("w8", "w9", "w10", "answer", ":")]
    assert len(e.prompt_ids) + len(e.answer_ids) == 8

    long_answer = " ".join(f"o{i}" for i in range(10))
    e = encode_examples(tok, [{"instruction": "q", "output": long_answer, "task": "t"}], template="{instruction}", max_len=8)[0]
    # answers are capped at max_len // 2 tokens, keeping their start
    assert e.answer_ids == [tok.vocab[f"o{i}"] for i in range(4)]
    assert e.prompt_ids == [BOS, tok.vocab["q"]]


def test_collate_exact_tensors():
    batch = [
        EncodedExample([1, 5, 6], [7, 2], "t"),
        EncodedExample([1, 5], [8, 9, 2], "t"),
        EncodedExample([1], [2], "t"),
    ]
    out = collate(batch, pad_id=PAD)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert out["input_ids"].dtype == out["labels"].dtype == out["attention_mask"].dtype == torch.long
    assert torch.equal(out["input_ids"], torch.tensor([[1, 5, 6, 7, 2], [1, 5, 8, 9, 2], [1, 2, 0, 0, 0]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]))
    n = IGNORE
    assert IGNORE == -100
    assert torch.equal(out["labels"], torch.tensor([[n, n, n, 7, 2], [n, n, 8, 9, 2], [n, 2, n, n, n]]))


def test_collate_pad_id_used():
    out = collate([EncodedExample([3], [4], "t"), EncodedExample([3, 3, 3], [4], "t")], pad_id=99)
    assert out["input_ids"][0].tolist() == [3, 4, 99, 99]
    assert out["labels"][0].tolist() == [IGNORE, 4, IGNORE, IGNORE]


# ---------------------------------------------------------------- round_lr


def test_round_lr_endpoints():
    assert round_lr(0.01, 0, 10, 0.1) == pytest.approx(0.01)
    assert round_lr(0.01, 9, 10, 0.1) == pytest.approx(0.001)
    assert round_lr(2.0, 4, 5, 0.0) == pytest.approx(0.0, abs=1e-15)
    # midpoint of the cosine: base * (min + (1 - min) / 2)
    assert round_lr(1.0, 2, 5, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    # a quarter of the way: cos(pi/4)
    assert round_lr(1.0, 1, 5, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_round_lr_single_round_is_base():
    assert round_lr(0.003, 0, 1) == 0.003


@pytest.mark.parametrize("rounds,ratio", [(2, 0.1), (7, 0.0), (25, 0.5), (3, 1.0)])
def test_round_lr_monotone_non_increasing(rounds, ratio):
    lrs = [round_lr(1e-3, r, rounds, ratio) for r in range(rounds)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * ratio)
    assert all(b <= a + 1e-18 for a, b in zip(lrs, lrs[1:]))


# ---------------------------------------------------------------- batch_stream


def _examples(n):
    # prompt [100 + i] identifies example i in the first column of every batch
    return [EncodedExample([100 + i], [i + 3, EOS], "t") for i in range(n)]


def _ids(batch):
    return [int(x) - 100 for x in batch["input_ids"][:, 0]]


def test_batch_stream_epoch_covers_every_example():
    stream = batch_stream(_examples(12), 4, PAD, torch.Generator().manual_seed(0))
    for _ in range(3):  # three epochs
        epoch = [_ids(b) for b in islice(stream, 3)]
        assert all(len(b) == 4 for b in epoch)
        assert sorted(i for b in epoch for i in b) == list(range(12))


def test_batch_stream_full_batches_only():
    stream = batch_stream(_examples(10), 4, PAD, torch.Generator().manual_seed(1))
    batches = list(islice(stream, 9))
    for b in batches:
        assert b["input_ids"].shape == (4, 3)
        assert len(set(_ids(b))) == 4
    # two full batches per epoch, the ragged tail of 2 dropped: no repeats within an epoch
    for e in range(0, 8, 2):
        ids = _ids(batches[e]) + _ids(batches[e + 1])
        assert len(set(ids)) == 8


def test_batch_stream_seeded():
    a = [_ids(b) for b in islice(batch_stream(_examples(10), 3, PAD, torch.Generator().manual_seed(7)), 8)]
    b = [_ids(b) for b in islice(batch_stream(_examples(10), 3, PAD, torch.Generator().manual_seed(7)), 8)]
    c = [_ids(b) for b in islice(batch_stream(_examples(10), 3, PAD, torch.Generator().manual_seed(8)), 8)]
    assert a == b
    assert a != c


def test_batch_stream_client_smaller_than_a_batch():
    stream = batch_stream(_examples(3), 8, PAD, torch.Generator().manual_seed(0))
    for b in islice(stream, 3):
        assert sorted(_ids(b)) == [0, 1, 2]


def test_batch_stream_empty_raises():
    with pytest.raises(ValueError):
        next(batch_stream([], 4, PAD, torch.Generator().manual_seed(0)))


def _reference_stream(examples, batch_size, generator):
    """The stream's rule written out plainly: reshuffle per epoch, full batches, ragged tail dropped."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < batch_size and len(order) >= batch_size:
                break
            yield chunk


@pytest.mark.parametrize("n, bs", [(10, 4), (12, 4), (3, 4), (7, 7)])
def test_batch_stream_follows_the_rule(n, bs):
    stream = batch_stream(_examples(n), bs, PAD, torch.Generator().manual_seed(3))
    reference = _reference_stream(list(range(n)), bs, torch.Generator().manual_seed(3))
    assert [_ids(b) for b in islice(stream, 11)] == [next(reference) for _ in range(11)]


def test_batch_stream_state_round_trip_continues_exactly():
    a = batch_stream(_examples(10), 4, PAD, torch.Generator().manual_seed(5))
    list(islice(a, 3))  # mid-epoch
    state = a.state_dict()
    expected = [_ids(b) for b in islice(a, 6)]
    b = batch_stream(_examples(10), 4, PAD, torch.Generator().manual_seed(999))
    b.load_state_dict(state)
    assert [_ids(x) for x in islice(b, 6)] == expected


def test_a_time_budget_cuts_training_off_between_steps():
    import time

    from fedrouter.core.train import ClientTimeout, time_budget, train_steps

    model = torch.nn.Linear(2, 1)
    calls = []

    class Model(torch.nn.Module):  # a model whose step takes 20 ms
        def forward(self, x, attention_mask):
            calls.append(1)
            time.sleep(0.02)
            return type("Out", (), {"loss": model(x).pow(2).mean()})()

    batches = iter(lambda: {"x": torch.ones(1, 2), "attention_mask": torch.ones(1, 2)}, None)
    params = list(model.parameters())
    stats = train_steps(Model(), params, batches, 5, 1e-3)  # no budget (and the optimizer's first-use imports done)
    assert stats.steps == 5 and len(calls) == 5
    calls.clear()
    with time_budget(0.3), pytest.raises(ClientTimeout, match=r"cut off after \d+ of 50 steps"):
        train_steps(Model(), params, batches, 50, 1e-3)
    assert 2 <= len(calls) < 50
