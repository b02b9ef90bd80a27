"""A real Flower deployment on loopback: a SuperLink over TLS with SuperNode authentication, two SuperNodes
(`fedrouter flower supernode`: short polls, forked ClientApps) holding partitions 0 and 1 (node 0 with a long-lived `fedrouter flower worker`, node 1 doing the work in
Flower's per-message ClientApp process), `flwr run` of the app `fedrouter flower app` writes -- 2 rounds
of FedRouter, its server killed after round 1 and resumed.
Every process is started by `LoopbackFederation` and stopped by its pid (with its children), never by name."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed")

from conftest import TINY_OVERRIDES, assert_same_run  # noqa: E402

from fedrouter.config import load_config  # noqa: E402
from fedrouter.experiment import run_experiment  # noqa: E402

from fedrouter.testing import LoopbackFederation, descendants  # noqa: E402


@pytest.mark.slow
def test_tls_deployment_with_authenticated_supernodes_runs_fedrouter(tmp_path, tiny_model_dir):
    # The ServerApp is killed (SIGKILL) after round 1's checkpoint and the run resumed with a second
    # `flwr run ... resume=true`; the nodes restore their clients' states from their own checkpoints,
    # and the result is the in-process run's, bit for bit.
    run_dir = tmp_path / "run"
    sets = {**TINY_OVERRIDES, "method": "fedrouter", "scenario": "dual", "n_clients": 2, "rounds": 2, "client_timeout_s": 300}
    with LoopbackFederation(tmp_path / "federation", supernodes=2, tls=True, workers=[0]) as federation:
        federation.run(sets, run_dir, timeout_s=900, kill_after_round=1)
        assert not (run_dir / "results.json").exists()
        for i in (0, 1):  # each node checkpointed its client in its own folder (its out-dir), not where the server said
            assert list((federation.node_dir(i) / run_dir.name / "checkpoints" / "nodes").glob(f"*/client{i}/state-*.state"))
        federation.run(None, run_dir, timeout_s=900)  # resume
        started = list(federation.procs)
    inprocess = tmp_path / "inprocess"
    run_experiment(load_config(None, {**sets, "engine": "inprocess"}), inprocess, progress=False)
    assert_same_run(inprocess, run_dir, also_ignore={"engine"})
    results = json.loads((run_dir / "results.json").read_text())
    assert results["engine"] == "flower" and results["method"] == "fedrouter"
    assert [row["client"] for row in results["per_client"]] == [0, 1]
    assert all(len(row["tasks"]) == 2 for row in results["per_client"])
    assert 0 <= results["rouge1"] <= 1 and results["bytes_up"] > 0  # (the tests' 60-step base says little)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["clients"] == 2 and not r["rejected"] for r in rounds)
    assert all(r["slowest_client_s"] > 0 for r in rounds)  # both nodes trained, the worker's and the other
    # the nodes clustered privately: the server knows what was chosen, but no task label reached it
    assert set(results["clustering"]["n_local"]) == {"0", "1"} and results["clustering"]["local_accuracy"] is None
    assert json.loads((run_dir / "config.json").read_text())["engine"] == "flower"
    assert results["adapters"] and all((run_dir / "adapters" / a / "adapter_model.safetensors").exists() for a in results["adapters"])
    for proc in started:  # everything started is gone, children included
        assert proc.poll() is not None and not descendants(proc.pid)


@pytest.mark.slow
def test_an_unregistered_supernode_is_refused(tmp_path, tiny_model_dir):
    # SuperNode authentication is on: a node whose key was never registered never joins, so the run
    # waits for it in vain and says so (node-wait-s), instead of training with a stranger.
    import subprocess

    from fedrouter.engines.flower.keys import make_keys
    from fedrouter.testing import BIN

    with LoopbackFederation(tmp_path / "federation", supernodes=0, tls=True) as federation:
        make_keys(tmp_path / "stranger", ["127.0.0.1"], supernodes=1)
        stranger = federation._start("stranger", [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{federation.port}",
                                                  "--root-certificates", str(federation.keys / "ca.crt"),
                                                  "--auth-supernode-private-key", str(tmp_path / "stranger" / "supernode-0"),
                                                  "--max-retries", "3", "--node-config", "partition-id=0 num-partitions=1"])
        code = stranger.wait(timeout=180)
        log = (federation.logs / "stranger.log").read_text()
        assert code != 0 and "Failed to activate SuperNode" in log, log[-2000:]
        nodes = subprocess.run([str(BIN / "flwr"), "supernode", "list", "fedrouter-loopback", "--format", "json"],
                               env=federation.env, capture_output=True, text=True, timeout=120, cwd=federation.workdir)
        assert nodes.returncode == 0, nodes.stderr
        listed = json.loads(nodes.stdout)
        online = [n for n in listed.get("nodes", []) if str(n.get("status", "")).lower() == "online"]
        assert not online, listed
