"""Kill a run (SIGKILL) mid-round, resume it, and get what the uninterrupted run got, bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import assert_same_run, kill_after_checkpoint

from fedrouter.checkpoint import path_of
from fedrouter.cli import main


def _args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={v}"]
    return out


def _overrides(tiny_overrides, **extra):
    # rounds long enough (about a second each) for the kill to land inside one
    return {**tiny_overrides, "rounds": 6, "n_clients": 3, "local_steps": 12, **extra}


def _kill_after_checkpoint(out: Path, overrides: dict, method: str, after_round: int) -> None:
    cmd = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--method", method, "--out", str(out), *_args(overrides)]
    kill_after_checkpoint(cmd, path_of(out, after_round))  # mid-way through the next round
    assert not (out / "results.json").exists(), "the run finished before the kill; make its rounds longer"


@pytest.mark.slow
@pytest.mark.parametrize("method, extra, kill_after", [
    ("fedrouter", {}, 2),
    ("feddpa", {"eval_every": 1}, 3),                                   # serving slots made mid-run
    ("flora", {"lora.client_ranks": "[4, 8]", "client_fraction": 0.67}, 1),  # rank slots, sampling
    ("flexlora", {"lora.client_ranks": "[2, 4]", "client_fraction": 0.67, "eval_every": 2}, 2),  # the global update, per-rank factors
    ("hetlora", {"lora.client_ranks": "[4, 16]", "method_options.prune_threshold": 10.0}, 2),  # ranks pruned mid-run
    ("fedex", {"client_fraction": 0.67}, 2),                            # residuals a sampled-out client catches up on
    ("fedalt", {"eval_every": 1, "client_fraction": 0.67}, 2),          # kept uploads, private mixers, sampling
    ("fedit", {"privacy.mode": '"central"', "privacy.noise_multiplier": 1.0, "privacy.clip": 0.1}, 2),  # DP noise draws
])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_overrides, tiny_model_dir, method, extra, kill_after):
    overrides = _overrides(tiny_overrides, **extra)
    whole = tmp_path / "whole"
    assert main(["run", "--quiet", "--method", method, "--out", str(whole), *_args(overrides)]) == 0
    killed = tmp_path / "killed"
    _kill_after_checkpoint(killed, overrides, method, kill_after)
    before = (killed / "metrics.jsonl").read_text().splitlines()[:kill_after]
    assert main(["run", "--quiet", "--resume", str(killed)]) == 0
    assert_same_run(whole, killed)
    # it continued rather than starting over: the rounds before the kill keep their own timings
    assert (killed / "metrics.jsonl").read_text().splitlines()[:kill_after] == before
    assert not (killed / "checkpoints").exists()  # a finished run keeps none


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_overrides, tiny_model_dir, caplog):
    overrides = _overrides(tiny_overrides, checkpoint_keep=3)
    whole = tmp_path / "whole"
    assert main(["run", "--quiet", "--method", "fedit", "--out", str(whole), *_args(overrides)]) == 0
    killed = tmp_path / "killed"
    _kill_after_checkpoint(killed, overrides, "fedit", 3)
    newest = sorted((killed / "checkpoints").glob("round-*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])   # truncated
    (killed / "checkpoints" / ".round-00009.safetensors.0a1b2c3d.tmp").write_bytes(b"half a write")  # a kill mid-write
    assert main(["run", "--quiet", "--resume", str(killed)]) == 0
    assert f"checkpoint {newest.name} is unreadable" in caplog.text
    assert_same_run(whole, killed)


def test_resume_refuses_what_it_cannot_resume(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "results.json").write_text("{}")
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "finished run" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--rounds", "3"]) == 2
    assert "give no other config" in capsys.readouterr().err
    (tmp_path / "results.json").unlink()
    assert main(["run", "--resume", str(tmp_path)]) == 2  # refused at once, before any model is built
    assert "no readable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "FAILED").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
