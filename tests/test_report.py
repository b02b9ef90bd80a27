"""`fedrouter report` and the plots: from a compare directory, a run directory and a scaling sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrouter.study.plots import method_colours
from fedrouter.cli import main
from fedrouter.study.report import _markdown_to_html


def _args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={v}"]
    return out


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory, tiny_model_dir) -> Path:
    from conftest import TINY_OVERRIDES

    out = tmp_path_factory.mktemp("report") / "cmp"
    overrides = {**TINY_OVERRIDES, "n_clients": 3, "eval_every": 1}
    assert main(["compare", "--methods", "fedrouter,fedit", "--scenarios", "dual", "--seeds", "1",
                 "--generalization", "--out", str(out), *_args(overrides)]) == 0
    return out


def test_compare_writes_figures_and_a_self_contained_report(compare_dir):
    figures = {p.name for p in (compare_dir / "figures").glob("*.png")}
    assert {"comparison.png", "generalization.png", "rounds-single.png", "rounds-dual.png",
            "embedding-map.png", "silhouette.png"} <= figures
    page = (compare_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figures)
    assert "<table>" in page and "fedrouter" in page and "Generalization" in page
    assert "src=\"http" not in page  # nothing fetched from elsewhere


def test_embedding_map_holds_tasks_and_clusters(compare_dir):
    emap = json.loads((compare_dir / "cells" / "fedrouter-dual-seed0" / "embedding_map.json").read_text())
    points = emap["points"]
    assert {"x", "y", "task", "cluster", "client"} <= set(points[0])
    assert {p["client"] for p in points} == {0, 1, 2}
    assert all(p["cluster"] >= 0 for p in points)  # every local cluster was mapped to a global one
    assert not (compare_dir / "cells" / "fedit-dual-seed0" / "embedding_map.json").exists()


def test_report_rebuilds_after_tables_are_deleted(compare_dir):
    (compare_dir / "table.md").unlink()
    (compare_dir / "report.html").unlink()
    assert main(["report", str(compare_dir)]) == 0
    assert (compare_dir / "table.md").is_file() and (compare_dir / "report.html").is_file()


def test_report_of_a_single_run(compare_dir):
    run = compare_dir / "cells" / "fedrouter-single-seed0"
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "fedrouter run" in page and page.count("data:image/png") == 3  # rounds, embedding map, silhouette


def test_report_of_nothing_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither" in err[0]


def test_scaling_sweep(tmp_path, tiny_overrides, tiny_model_dir):
    out = tmp_path / "scale"
    assert main(["compare", "--methods", "fedit", "--scenarios", "dual", "--scale", "2,4", "--out", str(out),
                 *_args(tiny_overrides)]) == 0
    rows = json.loads((out / "scaling.json").read_text())["rows"]
    assert [r["n_clients"] for r in rows] == [2, 4]
    assert json.loads((out / "scaling" / "fedit-dual-n4" / "results.json").read_text())["per_client"][3]["client"] == 3
    assert (out / "figures" / "scaling.png").is_file() and "Scaling" in (out / "report.html").read_text()


def test_markdown_tables_become_html():
    page = _markdown_to_html("# T\n\n| a | b |\n|---|---|\n| x | **0.5** |\n")
    assert "<h2>T</h2>" in page and "<th>a</th>" in page and "<td><b>0.5</b></td>" in page


def test_a_corrupt_results_file_is_one_clear_line(tmp_path, capsys):
    cell = tmp_path / "cmp" / "cells" / "fedit-dual-seed0"
    cell.mkdir(parents=True)
    (cell / "results.json").write_text('{"method": "fedit", "rouge1": 0.5')  # cut off mid-write
    assert main(["report", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "fedit-dual-seed0" in err[0]
    (cell / "results.json").write_text('{"method": "fedit"}')  # valid JSON, not a finished run
    assert main(["report", str(tmp_path / "cmp")]) == 2
    assert "not a finished fedrouter run" in capsys.readouterr().err


def test_the_silhouette_figure_marks_the_k_the_server_chose_not_the_prototypes_left():
    from fedrouter.study.plots import server_k

    # K-Means chose 3 prototypes (the curve's best); the assignment emptied one, which left with its prototype
    after = {"silhouette": {"global": {"1": 0.2, "2": 0.4, "3": 0.6, "4": 0.6}}, "n_prototypes": 2, "n_global": 2}
    assert server_k(after) == 3
    assert server_k({"silhouette": {"global": None}, "n_prototypes": 5, "n_global": 4}) == 5  # a K the user fixed


def test_every_compared_method_gets_its_own_colour():
    many = [f"m{i}" for i in range(13)]  # more than the default cycle's 10
    assert len(set(method_colours(many).values())) == 13
    assert len(set(method_colours(many[:4]).values())) == 4
