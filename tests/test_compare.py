"""`fedrouter compare`: the tables' arithmetic on hand-made cells, resuming, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrouter import rundir
from fedrouter.cli import main
from fedrouter.config import load_config
from fedrouter.study.compare import CompareSpec, run_cells
from fedrouter.study.tables import aggregate, load_cells, table_markdown, write_tables
from fedrouter.errors import FedrouterError


def fake_cell(root: Path, method: str, scenario: str, seed: int, clients: list[float], general: float,
              up: dict[str, int] | None = None):
    d = root / "cells" / f"{method}-{scenario}-seed{seed}"
    d.mkdir(parents=True)
    per_client = [{"client": i, "rouge1": v} for i, v in enumerate(clients)]
    results = {"method": method, "scenario": scenario, "seed": seed, "rouge1": sum(clients) / len(clients),
               "generalization": {"rouge1": general}, "base_rouge1": 0.1, "per_client": per_client,
               "per_task": {"t1": {"rouge1": clients[0], "n": 1}}, "bytes_up": 1, "bytes_down": 2, "wall_s": 3.0}
    if up is not None:
        results["bytes_per_client"] = {"up": up, "down": {c: 0 for c in up}}
    (d / "results.json").write_text(json.dumps(results))


def test_tables_mean_std_fairness_and_bold_best(tmp_path):
    fake_cell(tmp_path, "fedit", "single", 0, [0.2, 0.4], 0.5)
    fake_cell(tmp_path, "fedit", "single", 1, [0.4, 0.6], 0.7)
    fake_cell(tmp_path, "local", "single", 0, [0.1, 0.9], 0.1)
    fake_cell(tmp_path, "fedit", "dual", 0, [0.3, 0.3], 0.2)
    (tmp_path / "cells" / "local-dual-seed0").mkdir()  # an interrupted cell: no results.json, not counted
    rows = load_cells(tmp_path)
    assert len(rows) == 4
    summary = aggregate(rows)
    fedit = summary["cells"]["fedit|single"]
    assert fedit["rouge1"] == pytest.approx(0.4) and fedit["rouge1_std"] == pytest.approx(0.1414213, abs=1e-6)
    assert fedit["client_std"] == pytest.approx(0.1) and fedit["worst_client"] == pytest.approx(0.3)
    assert fedit["generalization"] == pytest.approx(0.6)
    assert summary["cells"]["local|single"]["worst_client"] == pytest.approx(0.1)
    assert "local|dual" not in summary["cells"]
    table = table_markdown(summary)
    assert "| fedit | 0.400 ± 0.141 | **0.300** (n=1) | **0.350** |" in table
    assert "| local | **0.500** (n=1) | - | - |" in table  # one seed of two; no dual cell: no average
    assert "| fedit | **0.600 ± 0.141** |" in table              # generalization column
    write_tables(tmp_path)
    assert (tmp_path / "summary.csv").read_text().count("\n") == 5  # header + 4 cells
    assert json.loads((tmp_path / "summary.json").read_text())["methods"] == ["fedit", "local"]


def test_upload_per_client_is_averaged_over_seeds_and_tabled(tmp_path):
    fake_cell(tmp_path, "flora", "dual", 0, [0.2, 0.4], 0.5, up={"0": 1_000_000, "1": 3_000_000})
    fake_cell(tmp_path, "flora", "dual", 1, [0.2, 0.4], 0.5, up={"0": 2_000_000, "1": 3_000_000})
    fake_cell(tmp_path, "fedit", "dual", 0, [0.2, 0.4], 0.5)  # a run from before per-client traffic: no row
    fake_cell(tmp_path, "fedsa", "dual", 0, [0.2, 0.4], 0.5, up={"0": 1_000_000, "1": 1_050_000})  # even: no row
    summary = aggregate(load_cells(tmp_path))
    assert summary["cells"]["flora|dual"]["up_per_client"] == {0: 1_500_000, 1: 3_000_000}
    table = table_markdown(summary)
    assert "| method | scenario | client 0 | client 1 |" in table
    assert "| flora | dual | 1.500 | 3.000 |" in table and "| fedit | dual |" not in table and "| fedsa | dual |" not in table


def test_method_options_are_per_method():
    spec = CompareSpec(["fedit", "fedprox"], ["dual"], [0], {"method_options.fedprox.mu": 0.5, "rounds": 3})
    cells = {c.method: spec.config(c) for c in spec.cells()}
    assert cells["fedprox"].method_options == {"mu": 0.5} and cells["fedit"].method_options == {}
    assert cells["fedit"].rounds == 3
    with pytest.raises(FedrouterError, match="per method"):
        CompareSpec(["fedit"], ["dual"], [0], {"method_options.mu": 0.5}).config(spec.cells()[0])
    with pytest.raises(FedrouterError, match="not among the compared methods"):
        CompareSpec(["fedit"], ["dual"], [0], {"method_options.ifca.k": 2}).config(spec.cells()[0])


def _compare(out: Path, overrides: dict, *extra: str) -> int:
    args = ["compare", "--methods", "fedit,local", "--scenarios", "dual", "--seeds", "1", "--out", str(out), *extra]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    return main(args)


def test_compare_end_to_end_and_resume(tmp_path, tiny_overrides, tiny_model_dir, capsys):
    out = tmp_path / "cmp"
    assert _compare(out, tiny_overrides) == 0
    for name in ("summary.csv", "summary.json", "table.md"):
        assert (out / name).is_file()
    finished = out / "cells" / "fedit-dual-seed0" / "results.json"
    stamp = finished.stat().st_mtime_ns
    # interrupt the other cell: its results vanish, a stray file stays
    (out / "cells" / "local-dual-seed0" / "results.json").unlink()
    (out / "cells" / "local-dual-seed0" / "stray").write_text("half-written")
    capsys.readouterr()
    assert _compare(out, tiny_overrides) == 0
    printed = capsys.readouterr().out
    assert "fedit-dual-seed0: finished earlier, skipped" in printed
    assert "local-dual-seed0: interrupted earlier, running again" in printed
    assert finished.stat().st_mtime_ns == stamp                       # not rerun
    assert (out / "cells" / "local-dual-seed0" / "results.json").is_file()
    assert not (out / "cells" / "local-dual-seed0" / "stray").exists()  # redone from scratch
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["cells"]) == {"fedit|dual", "local|dual"}


def test_compare_bad_input_is_one_line_exit_2(tmp_path, tiny_overrides, capsys):
    assert _compare(tmp_path / "x", {**tiny_overrides, "rounds": 0}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rounds" in err[0]
    assert not (tmp_path / "x").exists()  # every cell's config is checked before anything is written


@pytest.mark.slow
def test_quick_preset_on_a_tiny_config(tmp_path, tiny_overrides, tiny_model_dir):
    """--quick: fedrouter, fedit and local on single/dual/all, one seed, two worker processes."""
    out = tmp_path / "quick"
    args = ["compare", "--quick", "--out", str(out)]
    for k, v in tiny_overrides.items():  # the tiny sizes win over the preset's
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["fedit", "local", "fedrouter"] and summary["scenarios"] == ["single", "dual", "all"]
    assert len(summary["runs"]) == 9 and (out / "report.html").is_file()
    config = json.loads((out / "cells" / "fedit-dual-seed0" / "config.json").read_text())
    assert config["rounds"] == tiny_overrides["rounds"] and config["general_test_per_task"] == 2


def test_a_cell_another_compare_is_running_is_refused_not_deleted(tmp_path):
    # issue 32: a run directory is never run twice; an unfinished cell is redone only when nobody holds it
    cell = tmp_path / "cells" / "fedit-dual-seed0"
    with rundir.claim(cell, {"method": "fedit"}):  # as a running cell holds it
        with pytest.raises(FedrouterError, match="is in use by process"):
            run_cells({cell.name: load_config(None, {"method": "fedit"})}, tmp_path / "cells", jobs=1, echo=lambda _: None)
        assert (cell / "config.json").is_file()
