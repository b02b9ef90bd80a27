"""A run directory is worked on by one process at a time, never looks alive after a signal stopped it,
is read only from regular files, and never decides which base model `predict` and `serve` load or where
they write (issue 32)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES, kill_after_checkpoint, one_error_line, set_args

from fedrouter.checkpoint import path_of
from fedrouter.cli import main
from fedrouter.errors import FedrouterError
from fedrouter.testing import stop

pytestmark = pytest.mark.slow

RUN = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--method", "fedit"]
LONGER = {**TINY_OVERRIDES, "rounds": 4, "local_steps": 12}  # long enough to be caught mid-run


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the process ended before {what}: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_model_dir):
    """An unfinished fedit run with the checkpoint of round 1 (SIGKILLed mid-round 2)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    kill_after_checkpoint([*RUN, "--out", str(out), *set_args(LONGER)], path_of(out, 1))
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--quiet", "--method", "fedrouter", "--out", str(out), *set_args(TINY_OVERRIDES)]) == 0
    return out


# ------------------------------------------------------------------------------------------ the lock

def test_two_resumes_of_one_run_one_refuses_naming_the_other(killed_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    first = subprocess.Popen([*RUN[:3], "run", "--quiet", "--resume", str(run_dir)], stderr=subprocess.PIPE, text=True)
    try:
        lock = run_dir / ".lock"
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), first, "lock held by the resume")
        first.send_signal(signal.SIGSTOP)  # held mid-resume, whatever the machine's speed
        try:
            assert main(["run", "--quiet", "--resume", str(run_dir)]) == 2
            line = one_error_line(capsys.readouterr().err)
            assert f"is in use by process {first.pid}" in line, line
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        stop(first)
    assert (run_dir / "results.json").is_file() and not (run_dir / "FAILED").exists()


def test_the_lock_goes_with_its_process_and_a_claim_takes_it(tmp_path):
    from fedrouter import rundir

    lock = rundir.claim(tmp_path / "run", {"who": 1})
    with pytest.raises(FedrouterError, match=f"is in use by process {os.getpid()}"):
        rundir.RunLock(tmp_path / "run")
    lock.release()
    with rundir.RunLock(tmp_path / "run"):  # free again, and the pid it holds is the new holder's
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())
    # a killed run's lock (test_bad_input's resumes) is gone with the process: nothing to clean up


# --------------------------------------------------------------------------------------- the signals

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_run_is_marked_failed_with_the_signal_and_exits_128_plus_n(sig, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen([*RUN, "--out", str(out), *set_args(LONGER)], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: path_of(out, 1).exists(), proc, "first checkpoint")
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 128 + sig
        err = proc.stderr.read()
    finally:
        stop(proc)
    name = signal.Signals(sig).name
    assert f"fedrouter: stopped by {name}" in err and "Traceback" not in err, err
    assert f"stopped by {name}" in (out / "FAILED").read_text()
    assert not (out / "results.json").exists()
    # and the run resumes from there, as after any stop
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    assert (out / "results.json").is_file() and not (out / "FAILED").exists()


# ------------------------------------------------------------------------------- regular files only

def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


FIFO_CASES = {
    "resume, config.json": ("killed", "config.json", ["run", "--quiet", "--resume"], "config.json is a FIFO"),
    "resume, a checkpoint": ("killed", "checkpoints/round-00001.safetensors", ["run", "--quiet", "--resume"],
                             "no readable checkpoint"),
    "predict, config.json": ("finished", "config.json", ["predict", "--prompt", "x", "--"], "config.json is a FIFO"),
    "predict, router.json": ("finished", "router/router.json", ["predict", "--prompt", "x", "--"], "router.json is a FIFO"),
    "predict, base_model.json": ("finished", "base_model.json", ["predict", "--prompt", "x", "--"], "base_model.json is a FIFO"),
    "serve, config.json": ("finished", "config.json", ["serve", "--port", "0", "--"], "config.json is a FIFO"),
    "report, metrics.jsonl": ("finished", "metrics.jsonl", ["report"], "metrics.jsonl is a FIFO"),
}


@pytest.mark.parametrize("case", sorted(FIFO_CASES))
def test_a_fifo_in_a_run_directory_is_refused_not_waited_on(case, killed_run, finished_run, tmp_path):
    which, name, command, needle = FIFO_CASES[case]
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run if which == "killed" else finished_run, run_dir)
    _fifo(run_dir / name)
    # in a process of its own: were it to wait on the FIFO, the timeout fails the test instead of hanging it
    done = subprocess.run([sys.executable, "-m", "fedrouter.cli", *command, str(run_dir)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 2, done.stderr
    assert needle in one_error_line(done.stderr)


# ---------------------------------------------------------------------------- the base model to load

def _edit_config(run_dir: Path, **changes) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, **changes}))


def _answers(capsys) -> str:
    return "\n".join(line for line in capsys.readouterr().out.splitlines() if "->" in line)


def test_a_run_directory_does_not_choose_where_predict_writes_or_what_it_loads(finished_run, tmp_path, tiny_model_dir, capsys):
    assert main(["predict", str(finished_run), "--prompt", "hello"]) == 0
    expected = _answers(capsys)
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    planted = tmp_path / "planted-cache"
    _edit_config(run_dir, cache_dir=str(planted))
    assert main(["predict", str(run_dir), "--prompt", "hello"]) == 0  # the cache of this machine, not the run's
    assert _answers(capsys) == expected and not planted.exists()

    _edit_config(run_dir, model=str(tiny_model_dir))  # a run trained on a path: this machine must name its base
    assert main(["predict", str(run_dir), "--prompt", "hello"]) == 2
    assert "give it with --model" in one_error_line(capsys.readouterr().err)
    assert main(["predict", str(run_dir), "--prompt", "hello", "--model", str(tiny_model_dir)]) == 0
    assert _answers(capsys) == expected  # the same base under its path: the fingerprint matches


def _other_base(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny base with its embeddings moved: another model of the same shape and tokenizer."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in weights if "embed_tokens" in k)
    weights[name] = weights[name] + 0.5
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_predict_and_serve_refuse_a_base_the_adapters_were_not_trained_on(finished_run, tmp_path, tiny_model_dir, capsys):
    other = _other_base(tiny_model_dir, tmp_path / "other-base")
    for command in (["predict", str(finished_run), "--prompt", "hello"], ["serve", str(finished_run), "--port", "0"]):
        assert main([*command, "--model", str(other)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "is not the one this run's adapters were trained on" in line and "embed_tokens" in line, line
    for env in ({"FEDROUTER_MODEL": str(other)},):  # the environment's choice is checked the same way
        done = subprocess.run([sys.executable, "-m", "fedrouter.cli", "predict", str(finished_run), "--prompt", "x"],
                              capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
        assert done.returncode == 2 and "were trained on" in one_error_line(done.stderr)


def test_the_fingerprint_holds_across_dtypes_and_tells_models_apart(tiny_model_dir, tmp_path):
    import torch

    from fedrouter.core.hardware import Hardware
    from fedrouter.core.model import base_fingerprint, fingerprint_mismatch, load_base

    fp32, tok = load_base(str(tiny_model_dir), progress=False)
    bf16, _ = load_base(str(tiny_model_dir), progress=False, hardware=Hardware(torch.device("cpu"), torch.bfloat16))
    recorded = json.loads(json.dumps(base_fingerprint(fp32, tok)))  # as the run directory keeps it
    assert fingerprint_mismatch(recorded, base_fingerprint(bf16, tok)) is None
    other, _ = load_base(str(_other_base(tiny_model_dir, tmp_path / "other")), progress=False)
    assert "weights differ" in fingerprint_mismatch(recorded, base_fingerprint(other, tok))
    changed = {**recorded, "tokenizer": "0" * 64}
    assert "tokenizer" in fingerprint_mismatch(changed, base_fingerprint(fp32, tok))
