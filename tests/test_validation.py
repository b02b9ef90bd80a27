"""Updates are screened before aggregation: each kind of bad update is refused and contributes nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import ScriptedTransport
from fedrouter.core.aggregate import update_norm
from fedrouter.engines.loop import RoundLoop, screen_updates, update_problem
from fedrouter.methods import fedit
from fedrouter.methods.base import Message, MethodSetup

A, B = "m.lora_A.weight", "m.lora_B.weight"
SHAPES = {A: (1, 2), B: (2, 1)}


def upd(a, b, n=1):
    return Message({A: torch.tensor([a], dtype=torch.float32), B: torch.tensor(b, dtype=torch.float32)},
                   {"n_examples": n, "loss": 1.0, "tokens": 1})


@pytest.mark.parametrize("arrays, needle", [
    ({A: torch.tensor([[float("nan"), 0.0]]), B: torch.zeros(2, 1)}, "NaN or Inf"),
    ({A: torch.tensor([[float("inf"), 0.0]]), B: torch.zeros(2, 1)}, "NaN or Inf"),
    ({A: torch.zeros(1, 2, dtype=torch.int64), B: torch.zeros(2, 1)}, "not a floating-point tensor"),
    ({A: torch.zeros(1, 2)}, "missing tensor m.lora_B.weight"),
    ({A: torch.zeros(1, 2), B: torch.zeros(2, 1), "x": torch.zeros(1)}, "unexpected tensor x"),
    ({A: torch.zeros(1, 3), B: torch.zeros(2, 1)}, "has shape (1, 3), expected (1, 2)"),
])
def test_each_kind_of_bad_update_is_named(arrays, needle):
    assert needle in update_problem(arrays, SHAPES)


def test_a_good_update_passes():
    assert update_problem({A: torch.zeros(1, 2), B: torch.ones(2, 1)}, SHAPES) is None


def test_update_norm_counts_the_change_not_the_weights():
    sent = {A: torch.tensor([[3.0, 4.0]])}
    assert update_norm({A: torch.tensor([[3.0, 4.0]])}, sent) == 0.0
    assert update_norm({A: torch.tensor([[0.0, 0.0]])}, sent) == pytest.approx(5.0)
    assert update_norm({A: torch.tensor([[0.0, 0.0]]), B: torch.tensor([[0.0], [2.0]])}, sent) == pytest.approx(29 ** 0.5)


def _server():
    start = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    return fedit.Server(MethodSetup(0, 2), start, [0, 1, 2, 3, 4])


def test_aggregate_is_exactly_the_mean_of_the_valid_updates():
    server = _server()
    messages = server.configure_fit(0, [0, 1, 2, 3, 4])
    replies = {0: upd([1.0, 1.0], [[1.0], [1.0]]), 1: upd([3.0, 1.0], [[1.0], [3.0]]),
               2: upd([float("nan"), 0.0], [[0.0], [0.0]]),          # NaN
               3: upd([1000.0, 1000.0], [[1000.0], [1000.0]]),          # huge norm
               4: upd([2.0, 1.0], [[1.0], [2.0]])}
    kept, rejected = screen_updates(server, messages, replies, norm_ratio=10.0)
    assert sorted(kept) == [0, 1, 4]
    assert {r["client"]: r["reason"].split()[0] for r in rejected} == {2: "m.lora_A.weight", 3: "update"}
    server.aggregate_fit(0, kept)
    assert torch.equal(server.global_adapter[A], torch.tensor([[2.0, 1.0]]))
    assert torch.equal(server.global_adapter[B], torch.tensor([[1.0], [2.0]]))


def test_norm_screen_is_off_by_default_and_needs_three_updates():
    server = _server()
    messages = server.configure_fit(0, [0, 1])
    replies = {0: upd([1.0, 1.0], [[1.0], [1.0]]), 1: upd([1000.0, 0.0], [[0.0], [0.0]])}
    assert len(screen_updates(server, messages, replies)[0]) == 2
    assert len(screen_updates(server, messages, replies, norm_ratio=2.0)[0]) == 2  # two updates: no median


def test_a_round_with_no_acceptable_update_keeps_the_state(caplog):
    server = _server()
    good = {c: upd([1.0, 2.0], [[3.0], [4.0]]) for c in range(5)}
    bad = {c: Message({A: torch.zeros(1, 2)}, {"n_examples": 1, "loss": 1.0, "tokens": 1}) for c in range(5)}
    history = RoundLoop(server, ScriptedTransport({0: good, 1: bad}), [0, 1, 2, 3, 4], 2, 1.0, 0, progress=False).run()
    assert torch.equal(server.global_adapter[A], torch.tensor([[1.0, 2.0]]))  # round 1's result, kept
    assert history[0]["rejected"] == [] and len(history[1]["rejected"]) == 5
    assert history[1]["skipped"].startswith("0 acceptable update(s)")
    assert "update rejected: missing tensor m.lora_B.weight" in caplog.text


# --- failing clients --------------------------------------------------------------------------------------

from fedrouter.engines.inprocess import InProcessTransport  # noqa: E402
from fedrouter.errors import FedrouterError  # noqa: E402
from fedrouter.methods.base import ClientContext  # noqa: E402


class AddOne(fedit.Client):
    """Returns the global adapter plus one; raises where told to."""

    def __init__(self, failing=()):
        super().__init__(MethodSetup(0, 1))
        self.failing = set(failing)

    def fit(self, msg, ctx):
        if ctx.client_id in self.failing:
            raise ValueError("boom")
        return Message({k: v + 1 for k, v in msg.arrays.items()}, {"n_examples": 1, "loss": 1.0, "tokens": 1})


def _contexts(n):
    return {c: ClientContext(c, workbench=None) for c in range(n)}


def test_a_client_that_raises_is_dropped_and_the_round_goes_on():
    server = _server()
    transport = InProcessTransport(AddOne(failing={1}), _contexts(5), progress=False)
    history = RoundLoop(server, transport, [0, 1, 2, 3, 4], 2, 1.0, 0, progress=False).run()
    assert torch.equal(server.global_adapter[A], torch.full((1, 2), 2.0))  # two rounds of +1 from the others
    assert [r["client"] for h in history for r in h["rejected"]] == [1, 1]
    assert history[0]["rejected"][0]["reason"] == "client failed: ValueError: boom"


def test_every_client_failing_with_an_error_stops_the_run():
    transport = InProcessTransport(AddOne(failing={0, 1}), _contexts(2), progress=False)
    with pytest.raises(FedrouterError, match="every client failed; the first: ValueError: boom"):
        RoundLoop(_server(), transport, [0, 1], 1, 1.0, 0, progress=False).run()


def test_injected_failures_are_seeded_and_min_updates_keeps_the_state():
    rates = []
    for _ in range(2):
        server = _server()
        transport = InProcessTransport(AddOne(), _contexts(5), progress=False, inject_failures=0.5, seed=3)
        history = RoundLoop(server, transport, [0, 1, 2, 3, 4], 6, 1.0, 0, progress=False, min_updates=3).run()
        rates.append([len(h["rejected"]) for h in history])
        skipped = [h for h in history if "skipped" in h]
        assert all(len(h["rejected"]) > 2 for h in skipped)                       # fewer than 3 were left
        assert server.global_adapter[A][0, 0].item() == 6 - len(skipped)          # +1 per aggregated round only
    assert rates[0] == rates[1] and 0 < sum(rates[0]) < 30                        # seeded, and some failed


def test_a_run_with_30_percent_failing_clients_completes_and_reports_them(tmp_path, tiny_overrides, tiny_model_dir):
    import json

    from fedrouter.cli import main

    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--quiet", "--method", "fedit", "--inject-failures", "0.3"]
    for k, v in {**tiny_overrides, "rounds": 10, "n_clients": 4}.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    failed = results["rejected_updates"]
    assert failed and all(r["reason"] == "client failed: InjectedFailure: injected failure" for r in failed)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 10 and sum(len(r["rejected"]) for r in rounds) == len(failed)
    assert 4 <= len(failed) <= 20  # 30% of 40 client-rounds, give or take chance


class Sleepy(AddOne):
    def fit(self, msg, ctx):
        if ctx.client_id == 2:
            import time

            time.sleep(0.3)
        return super().fit(msg, ctx)


def test_a_client_over_the_time_budget_is_dropped():
    server = _server()
    transport = InProcessTransport(Sleepy(), _contexts(5), progress=False, client_timeout_s=0.15)
    history = RoundLoop(server, transport, [0, 1, 2, 3, 4], 1, 1.0, 0, progress=False).run()
    assert [r["client"] for r in history[0]["rejected"]] == [2]
    assert history[0]["rejected"][0]["reason"].startswith("client failed: ClientTimeout: took 0.")
    assert torch.equal(server.global_adapter[A], torch.ones(1, 2))


@pytest.mark.parametrize("method, options", [("local", {}), ("fedlease", {"method_options": {"warmup_rounds": 3}})])
def test_a_client_that_missed_its_one_initialisation_message_still_trains(method, options, tmp_path, tiny_overrides, tiny_model_dir):
    # Local and FedLEASE's warm-up send the initial adapter only with a client's first task; a client
    # that failed that round must start from the same initialisation later, not fail every round after.
    from fedrouter.config import load_config
    from fedrouter.experiment import run_experiment

    cfg = load_config(None, {**tiny_overrides, "method": method, "n_clients": 3, "rounds": 3, "inject_failures": 0.3, **options})
    results = run_experiment(cfg, tmp_path / "run", progress=False)
    reasons = [r["reason"] for r in results["rejected_updates"]]
    assert reasons and all(r == "client failed: InjectedFailure: injected failure" for r in reasons)
