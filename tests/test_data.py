import json
import logging
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrouter.core.data import build_federated_data, load_jsonl, split_count, task_shares
from fedrouter.errors import FedrouterError

TASKS4 = ["t0", "t1", "t2", "t3"]
SYNTHETIC_TASKS = {"paraphrase", "data_to_text", "summarize", "headline"}


# ---------------------------------------------------------------- task_shares


def test_single_scenario_one_task_per_client():
    shares = task_shares("single", TASKS4, 8)
    assert len(shares) == 8
    for i, s in enumerate(shares):
        assert s == {f"t{i % 4}": 1.0}


def test_dual_scenario_two_neighbouring_tasks_half_each():
    shares = task_shares("dual", TASKS4, 8)
    assert len(shares) == 8
    for i, s in enumerate(shares):
        assert s == {f"t{i % 4}": 0.5, f"t{(i + 1) % 4}": 0.5}


def test_dual_needs_two_tasks():
    with pytest.raises(FedrouterError):
        task_shares("dual", ["only"], 3)


def test_all_scenario_every_task_equal():
    shares = task_shares("all", TASKS4, 8)
    assert len(shares) == 8
    for s in shares:
        assert s == {t: 0.25 for t in TASKS4}


def test_dirichlet_shares_sum_to_one_and_are_seeded():
    a = task_shares("dirichlet", TASKS4, 6, seed=3, alpha=0.5)
    b = task_shares("dirichlet", TASKS4, 6, seed=3, alpha=0.5)
    c = task_shares("dirichlet", TASKS4, 6, seed=4, alpha=0.5)
    assert a == b
    assert a != c
    assert len(a) == 6
    for s in a:
        assert set(s) <= set(TASKS4)
        assert all(v > 0 for v in s.values())
        assert sum(s.values()) == pytest.approx(1.0)


def test_unknown_scenario():
    with pytest.raises(FedrouterError, match="bogus"):
        task_shares("bogus", TASKS4, 2)


# ---------------------------------------------------------------- split_count


def test_split_count_by_hand():
    assert split_count(10, {"a": 0.5, "b": 0.5}) == {"a": 5, "b": 5}
    assert split_count(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) in (
        {"a": 4, "b": 3, "c": 3}, {"a": 3, "b": 4, "c": 3}, {"a": 3, "b": 3, "c": 4})
    # 7 * (0.6, 0.4) = (4.2, 2.8): floors 4 + 2, the leftover goes to the larger remainder (b)
    assert split_count(7, {"a": 0.6, "b": 0.4}) == {"a": 4, "b": 3}
    # zero counts are dropped
    assert split_count(1, {"a": 0.9, "b": 0.1}) == {"a": 1}


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(min_value=0, max_value=5000),
    weights=st.lists(st.floats(min_value=1e-6, max_value=1.0, allow_nan=False), min_size=1, max_size=12),
)
def test_split_count_sums_exactly(total, weights):
    norm = sum(weights)
    shares = {f"t{i}": w / norm for i, w in enumerate(weights)}
    counts = split_count(total, shares)
    assert sum(counts.values()) == total
    assert set(counts) <= set(shares)
    for t, share in shares.items():
        # largest remainder: every count is the floor or the ceiling of its exact share
        assert abs(counts.get(t, 0) - total * share) < 1 + 1e-9
        assert counts.get(t, 1) > 0


# ---------------------------------------------------------------- synthetic federated data


def _synthetic(**kw):
    args = dict(source="synthetic", scenario="single", n_clients=8, train_per_client=12, test_per_client=6,
                general_test_per_task=3, seed=0)
    args.update(kw)
    return build_federated_data(**args)


def _key(ex):
    return (ex["instruction"], ex["output"])


@pytest.mark.parametrize("scenario", ["single", "dual", "all", "dirichlet"])
def test_synthetic_counts_and_tasks(scenario):
    data = _synthetic(scenario=scenario, n_clients=5)
    assert set(data.tasks) == SYNTHETIC_TASKS
    assert len(data.clients) == 5
    for cid, c in enumerate(data.clients):
        assert c.client_id == cid
        assert len(c.train) == 12
        assert len(c.test) == 6
        assert {ex["task"] for ex in c.train} <= set(c.tasks)
        assert {ex["task"] for ex in c.test} <= set(c.tasks)
        for ex in c.train + c.test:
            assert set(ex) == {"instruction", "output", "task"}
            assert isinstance(ex["instruction"], str) and isinstance(ex["output"], str)


def test_synthetic_single_scenario_client_tasks():
    data = _synthetic()
    for i, c in enumerate(data.clients):
        assert c.tasks == [data.tasks[i % 4]]
        assert {ex["task"] for ex in c.train} == {data.tasks[i % 4]}


def test_synthetic_dual_splits_evenly():
    data = _synthetic(scenario="dual", n_clients=4)
    for c in data.clients:
        assert len(c.tasks) == 2
        assert Counter(ex["task"] for ex in c.train) == {c.tasks[0]: 6, c.tasks[1]: 6}
        assert Counter(ex["task"] for ex in c.test) == {c.tasks[0]: 3, c.tasks[1]: 3}


def test_synthetic_clients_sharing_a_task_get_disjoint_examples():
    data = _synthetic(train_per_client=20, test_per_client=10)
    # clients i and i+4 share task i in scenario single. Paraphrase has a small space of examples,
    # where chance repeats are possible; the other three tasks have far larger ones.
    for i in range(4):
        a, b = data.clients[i], data.clients[i + 4]
        assert a.tasks == b.tasks
        if a.tasks == ["paraphrase"]:
            continue
        for split in ("train", "test"):
            ka = {_key(ex) for ex in getattr(a, split)}
            kb = {_key(ex) for ex in getattr(b, split)}
            assert len(ka) == len(getattr(a, split))  # no repeats within a client either
            assert not ka & kb, f"clients {i} and {i + 4} share {split} examples"
        # and a client's test examples are not its training examples
        assert not {_key(ex) for ex in a.train} & {_key(ex) for ex in a.test}


def test_synthetic_general_test_holds_every_task():
    data = _synthetic(general_test_per_task=3)
    assert Counter(ex["task"] for ex in data.general_test) == {t: 3 for t in SYNTHETIC_TASKS}


def test_synthetic_deterministic_for_a_seed():
    a, b, c = _synthetic(seed=5, scenario="dual"), _synthetic(seed=5, scenario="dual"), _synthetic(seed=6, scenario="dual")
    assert [(x.tasks, x.train, x.test) for x in a.clients] == [(x.tasks, x.train, x.test) for x in b.clients]
    assert a.general_test == b.general_test
    assert [x.train for x in a.clients] != [x.train for x in c.clients]


def test_task_subset():
    data = _synthetic(tasks=["headline", "summarize"], scenario="all", n_clients=2, train_per_client=4)
    assert set(data.tasks) == {"headline", "summarize"}
    for c in data.clients:
        assert {ex["task"] for ex in c.train} == {"headline", "summarize"}
    with pytest.raises(FedrouterError, match="nope"):
        _synthetic(tasks=["headline", "nope"])


# ---------------------------------------------------------------- load_jsonl


def _write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(i, task="a", field="task"):
    return {"instruction": f"question {i} of {task}", "output": f"answer {i}", field: task}


def test_load_jsonl_reads_rows_and_skips_blank_lines(tmp_path):
    f = _write_lines(tmp_path / "d.jsonl", [_row(0), "", {**_row(1, "b"), "extra": 3}])
    assert load_jsonl(f) == [
        {"instruction": "question 0 of a", "output": "answer 0", "task": "a"},
        {"instruction": "question 1 of b", "output": "answer 1", "task": "b"},
    ]


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(FedrouterError, match="not found"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_load_jsonl_malformed_line_reports_file_and_line(tmp_path):
    f = _write_lines(tmp_path / "bad.jsonl", [_row(0), _row(1), '{"instruction": "x", oops', _row(3)])
    with pytest.raises(FedrouterError) as exc:
        load_jsonl(f)
    assert f"{f}:3:" in str(exc.value)


def test_load_jsonl_line_numbers_count_blank_lines(tmp_path):
    f = _write_lines(tmp_path / "bad.jsonl", [_row(0), "", "", "not json"])
    with pytest.raises(FedrouterError) as exc:
        load_jsonl(f)
    assert f"{f}:4:" in str(exc.value)


def test_load_jsonl_missing_field(tmp_path):
    f = _write_lines(tmp_path / "d.jsonl", [_row(0), {"instruction": "q", "task": "a"}])
    with pytest.raises(FedrouterError) as exc:
        load_jsonl(f)
    assert f"{f}:2:" in str(exc.value) and "output" in str(exc.value)


def test_load_jsonl_non_string_field(tmp_path):
    f = _write_lines(tmp_path / "d.jsonl", [{"instruction": "q", "output": 3, "task": "a"}])
    with pytest.raises(FedrouterError, match="output"):
        load_jsonl(f)


def test_load_jsonl_task_field_missing(tmp_path):
    f = _write_lines(tmp_path / "d.jsonl", [_row(0)])  # has "task", not "category"
    with pytest.raises(FedrouterError, match="category"):
        load_jsonl(f, task_field="category")


def test_load_jsonl_non_object_line(tmp_path):
    f = _write_lines(tmp_path / "d.jsonl", [_row(0), "[1, 2]"])
    with pytest.raises(FedrouterError) as exc:
        load_jsonl(f)
    assert f"{f}:2:" in str(exc.value)


def test_load_jsonl_empty_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(FedrouterError, match="no examples"):
        load_jsonl(f)


# ---------------------------------------------------------------- JSONL folders


def _make_folder(root, n_train, n_test, tasks=("a", "b"), field="task"):
    root.mkdir(parents=True, exist_ok=True)
    _write_lines(root / "train.jsonl", [_row(i, t, field) for t in tasks for i in range(n_train)])
    _write_lines(root / "test.jsonl", [{**_row(i, t, field), "instruction": f"test {i} of {t}"}
                                       for t in tasks for i in range(n_test)])
    return root


def test_jsonl_folder_with_custom_task_field(tmp_path):
    folder = _make_folder(tmp_path / "data", 10, 6, tasks=("red", "blue"), field="category")
    data = build_federated_data(str(folder), "single", 4, 4, 2, 3, seed=0, task_field="category")
    assert data.tasks == ["blue", "red"]
    for i, c in enumerate(data.clients):
        assert c.tasks == [data.tasks[i % 2]]
        assert len(c.train) == 4 and len(c.test) == 2
        assert {ex["task"] for ex in c.train + c.test} == set(c.tasks)
        assert all(ex["instruction"].startswith("question") for ex in c.train)
        assert all(ex["instruction"].startswith("test") for ex in c.test)
    # clients 0 and 2 share "blue": disjoint examples
    for split in ("train", "test"):
        a = {_key(ex) for ex in getattr(data.clients[0], split)}
        b = {_key(ex) for ex in getattr(data.clients[2], split)}
        assert not a & b
    assert Counter(ex["task"] for ex in data.general_test) == {"red": 3, "blue": 3}


def test_jsonl_folder_default_task_field_fails_on_category_data(tmp_path):
    folder = _make_folder(tmp_path / "data", 3, 3, field="category")
    with pytest.raises(FedrouterError, match="'task'"):
        build_federated_data(str(folder), "single", 2, 2, 2, 1)


def test_jsonl_folder_missing_file(tmp_path):
    folder = _make_folder(tmp_path / "data", 3, 3)
    (folder / "test.jsonl").unlink()
    with pytest.raises(FedrouterError, match="test.jsonl"):
        build_federated_data(str(folder), "single", 2, 2, 2, 1)


def test_missing_data_folder(tmp_path):
    with pytest.raises(FedrouterError, match="not found"):
        build_federated_data(str(tmp_path / "nowhere"), "single", 2, 2, 2, 1)


def test_task_without_test_examples(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_lines(folder / "train.jsonl", [_row(0, "a"), _row(1, "b")])
    _write_lines(folder / "test.jsonl", [_row(0, "a")])
    with pytest.raises(FedrouterError, match="'b'"):
        build_federated_data(str(folder), "single", 2, 1, 1, 1)


def test_more_examples_than_available_scales_down(tmp_path, caplog):
    folder = _make_folder(tmp_path / "data", n_train=6, n_test=4)
    with caplog.at_level(logging.WARNING, logger="fedrouter.core.data"):
        # scenario all, 2 clients: each wants 5 of a and 5 of b (demand 10 per task, 6 there)
        data = build_federated_data(str(folder), "all", 2, 10, 4, 1, seed=0)
    assert "scaling down" in caplog.text
    for c in data.clients:
        # 5 * 6 // 10 = 3 per task per client
        assert Counter(ex["task"] for ex in c.train) == {"a": 3, "b": 3}
        # test: each wants 2 of a and 2 of b (demand 4, 4 there): not scaled
        assert Counter(ex["task"] for ex in c.test) == {"a": 2, "b": 2}
    a, b = data.clients
    assert not {_key(ex) for ex in a.train} & {_key(ex) for ex in b.train}
    assert not {_key(ex) for ex in a.test} & {_key(ex) for ex in b.test}


# ---------------------------------------------------------------- flan8


FLAN8_CATEGORIES = {
    "coreference", "entailment", "linguistic_acceptability", "paraphrase", "question_classification",
    "structure_to_text", "text_formatting", "word_disambiguation",
}


def test_flan8_single_scenario_one_category_per_client(flan8_dir):
    data = build_federated_data(str(flan8_dir), "single", 8, 20, 10, 2, seed=0, task_field="category")
    assert len(data.tasks) == 8
    assert set(data.tasks) == FLAN8_CATEGORIES
    seen = []
    for c in data.clients:
        assert len(c.tasks) == 1
        assert {ex["task"] for ex in c.train} == set(c.tasks)
        assert {ex["task"] for ex in c.test} == set(c.tasks)
        assert len(c.train) == 20 and len(c.test) == 10
        seen.append(c.tasks[0])
    assert sorted(seen) == sorted(FLAN8_CATEGORIES)  # every client a different category
    assert Counter(ex["task"] for ex in data.general_test) == {t: 2 for t in FLAN8_CATEGORIES}


def test_pool_smaller_than_its_clients_is_an_error_or_gives_everyone_data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_lines(folder / "train.jsonl", [_row(0), _row(1)])  # 2 training examples of task "a"
    _write_lines(folder / "test.jsonl", [_row(i) for i in range(8)])
    try:
        data = build_federated_data(str(folder), "single", 4, 3, 2, 1)  # 4 clients all hold "a"
    except FedrouterError:
        return  # refusing is fine
    assert all(len(c.train) > 0 for c in data.clients), [len(c.train) for c in data.clients]
