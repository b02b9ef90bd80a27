"""The Flower engine on Flower's simulation runtime: the same results as in-process, failures included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed")

from conftest import assert_same_run, kill_after_checkpoint  # noqa: E402

from fedrouter.checkpoint import path_of  # noqa: E402
from fedrouter.testing import flower_env, stop  # noqa: E402



def _cli(out: Path, overrides: dict, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--out", str(out), *extra]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())



def run_to_end(cmd: list[str], env: dict, log: Path, timeout_s: float) -> int:
    """Run `cmd` with its output in `log`; past `timeout_s` it is stopped (by pid, with its children)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"ran past {timeout_s} s; log: {log.read_text()[-3000:]}") from None
        finally:
            stop(proc)


def _both_engines(tmp_path: Path, overrides: dict, kill_after_round: int | None = None) -> tuple[Path, Path]:
    env = flower_env(tmp_path / "flwr-home")
    inproc, flower = tmp_path / "inprocess", tmp_path / "flower"
    assert run_to_end(_cli(inproc, overrides), env, tmp_path / "inprocess.log", 600) == 0, (tmp_path / "inprocess.log").read_text()[-3000:]
    if kill_after_round is None:
        code = run_to_end(_cli(flower, overrides, "--engine", "flower"), env, tmp_path / "flower.log", 600)
    else:
        kill_after_checkpoint(_cli(flower, overrides, "--engine", "flower"), path_of(flower, kill_after_round), 600,
                              env, tmp_path / "killed.log")
        assert not (flower / "results.json").exists()
        resume = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--resume", str(flower)]
        code = run_to_end(resume, env, tmp_path / "flower.log", 600)
    assert code == 0, (tmp_path / "flower.log").read_text()[-3000:]
    return inproc, flower


def _assert_same(a: Path, b: Path) -> None:
    assert _results(b)["engine"] == "flower" and _results(a)["engine"] == "inprocess"
    assert_same_run(a, b, also_ignore={"engine"})


@pytest.mark.slow
def test_flower_simulation_matches_inprocess_failing_clients_included(tmp_path, tiny_overrides, tiny_model_dir):
    # The ClientApp really raises on its node for the clients the seeded draws pick; the rounds go on,
    # and the same clients fail in the same rounds as in-process.
    overrides = {**tiny_overrides, "method": "fedit", "scenario": "dual", "n_clients": 3, "rounds": 4, "eval_every": 2,
                 "inject_failures": 0.4}
    inproc, flower = _both_engines(tmp_path, overrides)
    failures = _results(flower)["client_failures_per_round"]
    assert len(failures) == 4 and sum(failures) > 0, "the seed must make some client fail"
    reasons = [r["reason"] for r in _results(flower)["rejected_updates"]]
    assert reasons and all(r == "client failed: InjectedFailure: injected failure" for r in reasons)
    _assert_same(inproc, flower)


@pytest.mark.slow
def test_a_killed_flower_simulation_resumes_to_the_inprocess_result(tmp_path, tiny_overrides, tiny_model_dir):
    # Killed (SIGKILL, Ray and all) after its round-1 checkpoint and resumed with `fedrouter run --resume`:
    # the nodes reload their clients' private states (FedRouter's local clusters) from their own checkpoints.
    overrides = {**tiny_overrides, "method": "fedrouter", "scenario": "dual", "n_clients": 3, "rounds": 3, "eval_every": 2}
    inproc, flower = _both_engines(tmp_path, overrides, kill_after_round=1)
    _assert_same(inproc, flower)
    assert _results(flower)["clustering"]["n_global"] >= 1
