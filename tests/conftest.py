"""Shared fixtures: one torch thread, a private model cache, the tiny base model, fast run overrides."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fedrouter.methods.fedrouter.scoring import truth_scores

torch.set_num_threads(1)

# CI sets FEDROUTER_CACHE; otherwise keep this session's models out of the user's cache.
_CREATED_CACHE: str | None = None
if not os.environ.get("FEDROUTER_CACHE"):
    _CREATED_CACHE = tempfile.mkdtemp(prefix="fedrouter-test-cache-")
    os.environ["FEDROUTER_CACHE"] = _CREATED_CACHE

REPO_ROOT = Path(__file__).resolve().parents[1]
FLAN8_DIR = (REPO_ROOT / ".." / "shared" / "data" / "flan8").resolve()

# A tiny base with a short pretraining: enough for every test that needs a real model.
TINY_PRETRAIN_STEPS = 60
TINY_PRETRAIN_DOCUMENTS = 3000

TINY_OVERRIDES = {
    "tiny.pretrain_steps": TINY_PRETRAIN_STEPS,
    "tiny.pretrain_documents": TINY_PRETRAIN_DOCUMENTS,
    "rounds": 2,
    "n_clients": 2,
    "local_steps": 2,
    "batch_size": 4,
    "train_per_client": 16,
    "test_per_client": 8,
    "general_test_per_task": 2,
    "max_new_tokens": 8,
    "threads": 1,
}


# What FedRouter may release under DP centroids (its `check_privacy`): a fixed K per client, each example by
# its sub-cluster, the nearest-prototype router.
FEDROUTER_DP_OPTIONS = {"n_local": 2, "assign": "sub-cluster", "global_router": "prototype"}


def pytest_unconfigure(config):
    if _CREATED_CACHE is not None:
        shutil.rmtree(_CREATED_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["FEDROUTER_CACHE"])


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir) -> Path:
    """The cached tiny base (built once per cache): a Hugging Face model directory."""
    from fedrouter.core.model import TinyBaseSpec, ensure_tiny_base

    return ensure_tiny_base(TinyBaseSpec(pretrain_steps=TINY_PRETRAIN_STEPS, pretrain_documents=TINY_PRETRAIN_DOCUMENTS), cache_dir, progress=False)


@pytest.fixture
def tiny_overrides() -> dict:
    """Config overrides for an end-to-end run that takes seconds (a fresh copy per test)."""
    return dict(TINY_OVERRIDES)


@pytest.fixture
def flan8_dir() -> Path:
    if not FLAN8_DIR.is_dir():
        pytest.skip(f"flan8 data not found at {FLAN8_DIR}; it lives beside the repo in shared/data/flan8")
    return FLAN8_DIR


def set_args(overrides: dict) -> list[str]:
    """Config overrides as `--set KEY=VALUE` arguments."""
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def one_error_line(err: str) -> str:
    """The one `fedrouter: error: ...` line of a refused command (and no traceback anywhere)."""
    lines = [line for line in err.splitlines() if line.startswith("fedrouter: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def exit_code(command) -> int:
    """What the `fedrouter` command would exit with: main's return value, or argparse's SystemExit code."""
    try:
        return command()
    except SystemExit as exc:
        return exc.code


TIMING_KEYS = {"wall_s", "timings", "run_dir"}  # results.json keys that differ between identical runs


# FedRouter's scores against the true tasks: an in-process run has them, a Flower run (labels stay on the
# nodes) reports null; the clustering it chose is compared all the same. The keys are the scorer's own.
TRUTH_KEYS = set(truth_scores(None, {}))


def _without_truth(results: dict) -> dict:
    if "clustering" not in results:
        return results
    return {**results, "clustering": {k: v for k, v in results["clustering"].items() if k not in TRUTH_KEYS}}


def assert_same_run(a: Path, b: Path, also_ignore: set[str] = frozenset()) -> None:
    """Two run directories hold the same run: results (but timings), per-round metrics (but seconds) and
    every adapter, bit for bit."""
    import json

    from safetensors.torch import load_file

    skip = TIMING_KEYS | set(also_ignore)
    ra, rb = (_without_truth(json.loads((d / "results.json").read_text())) for d in (a, b))
    assert {k: v for k, v in ra.items() if k not in skip} == {k: v for k, v in rb.items() if k not in skip}
    rounds = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("round_s", "slowest_client_s")}
                        for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rounds(a) == rounds(b)
    for name in ra["adapters"]:
        ta, tb = (load_file(str(d / "adapters" / name / "adapter_model.safetensors")) for d in (a, b))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f"adapter {name} differs"


def kill_after_checkpoint(cmd: list[str], checkpoint: Path, timeout_s: float = 240, env: dict | None = None,
                          log: Path | None = None) -> None:
    """Run `cmd` (its output in `log`) until `checkpoint` appears, then SIGKILL it and every process below
    it at once, by pid (a machine that dies does not stop its processes in order)."""
    from fedrouter.testing import descendants, kill_now, stop

    out = log.open("w") if log else subprocess.DEVNULL
    tail = lambda: log.read_text()[-3000:] if log else ""  # noqa: E731
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not checkpoint.exists():
            assert proc.poll() is None, f"the run ended before it could be killed {tail()}"
            assert time.monotonic() < deadline, f"no {checkpoint.name} after {timeout_s} s {tail()}"
            time.sleep(0.02)
        kill_now([proc.pid, *descendants(proc.pid)])
    finally:
        stop(proc)  # whatever was missed above (by pid, with its children)
        if log:
            out.close()


class ScriptedTransport:
    """Replies as scripted per round: {round: {client: reply}}."""

    def __init__(self, script):
        self.script, self.round = script, -1

    def fit(self, messages):
        self.round += 1
        return {cid: self.script[self.round][cid] for cid in messages}
