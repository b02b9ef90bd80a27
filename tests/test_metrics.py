import pytest

from fedrouter.core.metrics import METRICS, merge_per_task, merge_task_means, score_example, score_predictions


def test_rouge_by_hand_three_words():
    s = score_example("the cat sat", "the cat ran")
    # unigrams: 2 of 3 shared both ways -> P = R = F = 2/3
    assert s["rouge1"] == pytest.approx(2 / 3)
    # bigrams: pred {the cat, cat sat}, ref {the cat, cat ran}: 1 of 2 -> 1/2
    assert s["rouge2"] == pytest.approx(1 / 2)
    # longest common subsequence "the cat": 2 of 3 -> 2/3
    assert s["rougeL"] == pytest.approx(2 / 3)
    assert s["exact_match"] == 0.0


def test_rouge1_unequal_lengths():
    # pred 2 tokens, ref 4 tokens, 2 shared: P = 1, R = 1/2, F = 2PR/(P+R) = 2/3
    s = score_example("big cat", "a big black cat")
    assert s["rouge1"] == pytest.approx(2 / 3)
    # pred 1 token of ref's 4: P = 1, R = 1/4 -> F = 2 * 1/4 / (5/4) = 2/5
    assert score_example("cat", "a big black cat")["rouge1"] == pytest.approx(0.4)
    # nothing shared
    assert score_example("dog", "a big black cat")["rouge1"] == 0.0


def test_exact_match_ignores_case_and_whitespace():
    assert score_example("  The   Cat\tsat \n", "the cat sat")["exact_match"] == 1.0
    assert score_example("the cat sat", "the cat sat")["rouge1"] == pytest.approx(1.0)
    assert score_example("the cat sat.", "the cat sat")["exact_match"] == 0.0
    assert score_example("the cats sat", "the cat sat")["exact_match"] == 0.0


def test_score_predictions_per_task_means_and_counts():
    preds = ["the cat sat", "yes", "no"]
    refs = ["the cat ran", "yes", "yes"]
    tasks = ["story", "qa", "qa"]
    rep = score_predictions(preds, refs, tasks)
    assert rep["n"] == 3
    assert set(rep["per_task"]) == {"story", "qa"}
    qa, story = rep["per_task"]["qa"], rep["per_task"]["story"]
    assert qa["n"] == 2 and story["n"] == 1
    assert qa["rouge1"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert qa["exact_match"] == pytest.approx(0.5)
    assert story["rouge1"] == pytest.approx(2 / 3)
    assert story["exact_match"] == 0.0
    # overall means are over examples, not over tasks
    assert rep["rouge1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert rep["exact_match"] == pytest.approx(1 / 3)
    assert rep["rouge2"] == pytest.approx((1 / 2 + 0 + 0) / 3)  # one-word strings have no bigrams
    assert set(METRICS) <= set(rep)


def test_score_predictions_length_mismatch():
    with pytest.raises(ValueError):
        score_predictions(["a", "b"], ["a"], ["t", "t"])
    with pytest.raises(ValueError):
        score_predictions(["a"], ["a"], [])


def test_score_predictions_empty():
    rep = score_predictions([], [], [])
    assert rep["n"] == 0 and rep["per_task"] == {}


def _entry(n, value):
    return {"n": n, **{k: value for k in METRICS}}


def test_merge_task_means_is_example_weighted():
    rep1 = {"a": _entry(1, 1.0)}
    rep2 = {"a": _entry(3, 0.0), "b": {"n": 4, "rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.5, "exact_match": 0.0}}
    out = merge_task_means([rep1, rep2])
    assert out["n"] == 8
    # rouge1: (1*1 + 3*0 + 4*0.5) / 8 = 3/8; a plain mean of task means would differ
    assert out["rouge1"] == pytest.approx(3 / 8)
    assert out["rouge2"] == pytest.approx((1 + 0 + 1) / 8)
    assert out["exact_match"] == pytest.approx(1 / 8)


def test_merge_task_means_no_examples():
    assert merge_task_means([]) == {"n": 0}
    assert merge_task_means([{}, {}]) == {"n": 0}


def test_merge_per_task():
    rep1 = {"a": _entry(2, 1.0), "b": _entry(1, 0.0)}
    rep2 = {"a": _entry(6, 0.0)}
    rep3 = {"c": _entry(5, 0.2)}
    out = merge_per_task([rep1, rep2, rep3])
    assert list(out) == ["a", "b", "c"]
    assert out["a"]["n"] == 8
    assert out["a"]["rouge1"] == pytest.approx(2 / 8)
    assert out["b"] == {"n": 1, **{k: 0.0 for k in METRICS}}
    assert out["c"]["n"] == 5 and out["c"]["rougeL"] == pytest.approx(0.2)


def test_score_then_merge_equals_scoring_everything_at_once():
    preds_1, refs_1 = ["the cat sat", "no"], ["the cat ran", "no"]
    preds_2, refs_2 = ["a big dog"], ["a small dog"]
    r1 = score_predictions(preds_1, refs_1, ["x", "y"])
    r2 = score_predictions(preds_2, refs_2, ["x"])
    merged = merge_task_means([r1["per_task"], r2["per_task"]])
    whole = score_predictions(preds_1 + preds_2, refs_1 + refs_2, ["x", "y", "x"])
    for k in METRICS:
        assert merged[k] == pytest.approx(whole[k])
    assert merge_per_task([r1["per_task"], r2["per_task"]])["x"]["rouge1"] == pytest.approx(whole["per_task"]["x"]["rouge1"])
