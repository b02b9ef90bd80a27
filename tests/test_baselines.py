"""FedProx, FedSA-LoRA and FFA-LoRA: their defining rules, exactly, and end to end through the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedrouter.cli import main
from fedrouter.core.aggregate import weighted_average
from fedrouter.methods import METHODS, fedsa, ffa
from fedrouter.methods.base import ClientContext, Message, MethodSetup
from fedrouter.methods.common import lora_matrices
from fedrouter.methods.fedprox import proximal_term

SETUP = MethodSetup(seed=0, rounds=1)
A, B = "m.lora_A.weight", "m.lora_B.weight"


def test_fedprox_term_gradient_is_mu_times_distance_to_global():
    anchor = {A: torch.tensor([[1.0, -2.0]]), B: torch.tensor([[0.5], [0.0]])}
    live = {A: torch.tensor([[3.0, 0.0]], requires_grad=True), B: torch.tensor([[0.5], [4.0]], requires_grad=True)}
    mu = 0.1
    term = proximal_term(anchor, mu)(live)
    assert term.item() == pytest.approx(0.5 * mu * (4 + 4 + 0 + 16))
    term.backward()
    for k in anchor:
        assert torch.allclose(live[k].grad, mu * (live[k].detach() - anchor[k]))


class FakeWorkbench:
    """Records what it was asked to train and returns a known result."""

    def __init__(self, result):
        self.result, self.n_train, self.calls = result, 7, []

    def initial_adapter(self, rank=None):
        return {A: torch.ones(1, 2), B: torch.zeros(2, 1)}

    def train(self, adapter, round_idx, **kw):
        self.calls.append((adapter, kw))
        return self.result, SimpleNamespace(loss=1.0, tokens=3, seconds=0.1)


def test_fedsa_uploads_a_only_keeps_b_and_evaluates_with_its_own_b():
    trained = {A: torch.full((1, 2), 2.0), B: torch.full((2, 1), 5.0)}
    ctx = ClientContext(0, FakeWorkbench(trained))
    client = fedsa.Client(SETUP)
    reply = client.fit(Message({A: torch.full((1, 2), 9.0)}, {"round": 0}), ctx)
    assert set(reply.arrays) == {A}                       # B never uploaded
    assert torch.equal(ctx.state["B"][B], trained[B])     # ... it stays with the client
    start = ctx.workbench.calls[0][0]
    assert torch.equal(start[A], torch.full((1, 2), 9.0)) and torch.equal(start[B], torch.zeros(2, 1))
    evaluated = client.eval_adapter(Message({A: torch.zeros(1, 2)}), ctx)
    assert torch.equal(evaluated[B], trained[B]) and torch.equal(evaluated[A], torch.zeros(1, 2))


def test_fedsa_server_averages_a_by_examples():
    server = fedsa.Server(SETUP, {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}, [0, 1])
    assert set(server.configure_fit(0, [0])[0].arrays) == {A}
    replies = {0: Message({A: torch.tensor([[1.0, 1.0]])}, {"n_examples": 1, "loss": 1.0, "tokens": 1}),
               1: Message({A: torch.tensor([[5.0, -3.0]])}, {"n_examples": 3, "loss": 1.0, "tokens": 1})}
    server.aggregate_fit(0, replies)
    assert torch.allclose(server.global_adapter[A], torch.tensor([[4.0, -2.0]]))


def test_ffa_aggregate_equals_mean_of_products():
    a = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])  # r=2 x in=3, frozen and shared
    bs = [torch.randn(4, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    weights = [1, 2, 5]
    avg_b = weighted_average([{B: b} for b in bs], weights)[B]
    mean_product = sum(w * (b @ a) for w, b in zip(weights, bs)) / sum(weights)
    assert torch.allclose(avg_b @ a, mean_product, atol=1e-6)


def test_ffa_training_never_changes_a(tiny_model_dir):
    from fedrouter.core import synthetic
    from fedrouter.core.data import ClientData
    from fedrouter.core.model import LoraSettings, load_base
    from fedrouter.core.workbench import ClientWorkbench, SharedModel, TrainSettings

    model, tok = load_base(str(tiny_model_dir))
    shared = SharedModel(model, tok, LoraSettings(), TrainSettings(local_steps=3, batch_size=4, lr=1e-2))
    ex = synthetic.generate_examples("headline", 12, seed="ffa")
    wb = ClientWorkbench(shared, ClientData(0, ["headline"], ex, ex[:2]), ex[:2], seed=0)
    ctx = ClientContext(0, wb)
    start = shared.initial_adapter
    reply = ffa.Client(SETUP).fit(Message(lora_matrices(start, "lora_B"), {"round": 0}), ctx)
    assert set(reply.arrays) == set(lora_matrices(start, "lora_B"))                  # only B travels
    after = shared.adapter()
    assert all(torch.equal(after[k], v) for k, v in lora_matrices(start, "lora_B", exclude=True).items())   # A bit for bit
    assert any(not torch.equal(reply.arrays[k], v) for k, v in lora_matrices(start, "lora_B").items())  # B moved
    assert all(p.grad is None for p in shared.live_parameters().values())


def _run(out_root, overrides, method, scenario):
    out = out_root / f"{method}-{scenario}"
    args = ["run", "--out", str(out), "--quiet", "--method", method, "--scenario", scenario]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module", params=["single", "dual", "all"])
def every_method(request, tmp_path_factory, tiny_model_dir):
    """Every registered method run through `fedrouter run` on one scenario: {method: results.json}."""
    from conftest import TINY_OVERRIDES

    root = tmp_path_factory.mktemp(f"methods-{request.param}")
    # 3 clients: enough for FedCluster/IFCA/FedLEASE to form more than one group
    overrides = {**TINY_OVERRIDES, "n_clients": 3}
    return request.param, {m: _run(root, overrides, m, request.param) for m in METHODS}


@pytest.mark.slow
def test_every_method_runs_end_to_end(every_method):
    scenario, results = every_method
    for method, r in results.items():
        assert r["method"] == method and r["scenario"] == scenario
        assert 0.0 <= r["rouge1"] <= 1.0 and 0.0 <= r["generalization"]["rouge1"] <= 1.0
        assert len(r["per_client"]) == 3
        assert r["bytes_down"] > 0 and (r["bytes_up"] > 0 or method == "local")
        assert sum(r["bytes_per_client"]["up"].values()) == r["bytes_up"]  # per client adds up to the whole
        assert sum(r["bytes_per_client"]["down"].values()) == r["bytes_down"]
        assert r["rejected_updates"] == []  # every method's uploads match what it declares it sends


@pytest.mark.slow
def test_what_each_method_sends(every_method):
    _, results = every_method
    fedit = results["fedit"]
    assert results["fedprox"]["bytes_up"] == fedit["bytes_up"]
    # A (r x in) and B (out x r) of q/v are the same size here: half the matrices is half the bytes
    assert results["fedsa"]["bytes_up"] * 2 == fedit["bytes_up"]
    assert results["ffa"]["bytes_up"] * 2 == fedit["bytes_up"]
    assert results["local"]["bytes_up"] == 0
    # IFCA downloads its 4 cluster adapters where FedIT downloads one; it uploads one, like FedIT
    assert results["ifca"]["bytes_down"] == 4 * fedit["bytes_down"] and results["ifca"]["bytes_up"] == fedit["bytes_up"]
    # FLoRA's download is the stacked module: 3 clients' ranks, once per round after the first
    assert results["flora"]["flora"]["stacked_rank_per_round"] == [24, 24]
    assert results["flora"]["bytes_up"] == fedit["bytes_up"]
    merged = load_file(str(Path(results["flora"]["run_dir"]) / "merged_update.safetensors"))
    assert merged and all(t.shape == (128, 128) for t in merged.values())  # q/v of the tiny base
    # FedDPA uploads only its global adapter; its local adapters are saved per client
    assert results["feddpa"]["bytes_up"] == fedit["bytes_up"]
    assert {"client0-local", "global"} <= set(results["feddpa"]["adapters"])
    assert 0.0 <= results["feddpa"]["feddpa_lambda"]["test"] <= 1.0
    # FedALT: its individual adapter up, its rest of the world down (to train and to evaluate), as FedIT's
    # adapter goes; the individual adapters are saved per client
    assert (results["fedalt"]["bytes_up"], results["fedalt"]["bytes_down"]) == (fedit["bytes_up"], fedit["bytes_down"])
    assert {f"client{c}-individual" for c in range(3)} == set(results["fedalt"]["adapters"])


@pytest.mark.parametrize("method, option, needle", [
    ("fedit", "server_opt=sgd", "server_opt must be one of"),
    ("fedprox", "server_lr=-1", "server_lr must be a positive number"),
    ("fedsa", "aggregation=mode", "aggregation must be one of"),
    ("fedcluster", "n_cluster=2", "unknown method option(s) n_cluster"),
    ("ifca", "k=two", "option k must be an integer"),
    ("flora", "ranks=[4]", "unknown method option(s) ranks"),
    ("feddpa", "mix=1.5", "mix must be in (0, 1)"),
    ("fedlease", "max_clusters=1", "max_clusters >= 2"),
    ("fedalt", "mixer=1.5", "mixer must be \"learned\" or the individual adapter's fixed weight"),
])
def test_bad_method_option_is_one_line_and_exit_2(tmp_path, tiny_overrides, tiny_model_dir, capsys, method, option, needle):
    key, value = option.split("=", 1)
    args = ["run", "--out", str(tmp_path / "run"), "--quiet", "--method", method, "--set", f"method_options.{key}={value}"]
    for k, v in tiny_overrides.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and method in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedcluster", "ifca", "feddpa", "flora", "fedlease"])
def test_peers_with_partial_participation(tmp_path, tiny_overrides, tiny_model_dir, method):
    """Half the clients per round: clients missing from the clustering round, FLoRA's rounds, etc."""
    overrides = {**tiny_overrides, "n_clients": 4, "rounds": 3, "client_fraction": 0.5}
    if method == "fedcluster":
        overrides["method_options.cluster_round"] = 2
    if method == "fedlease":
        overrides["method_options.warmup_rounds"] = 2
    r = _run(tmp_path, overrides, method, "dual")
    assert len(r["per_client"]) == 4 and r["rejected_updates"] == []
    if method in ("fedcluster", "fedlease"):
        assert set(r["client_clusters"]) == {"0", "1", "2", "3"}  # every client has a group, sampled or not
