"""Differential privacy, exact on small tensors: clipping bounds every update's norm; with no noise the DP
aggregate is the clipped mean; the noise has the configured std; ε is the library's and grows with rounds;
local mode uploads nothing unclipped; the centroid noise follows its clip; a budget the rounds would exceed
is refused; and a run reports ε per round and at the end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedrouter.config import load_config
from fedrouter.core.privacy import (Accountant, DPAverage, clip, clip_upload, noisy_centroids, privatize_upload,
                                    update_norm)
from fedrouter.errors import FedrouterError


def test_clipping_bounds_the_joint_norm_exactly_and_leaves_small_updates_alone():
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0], [4.0]])}  # joint norm 5
    clipped = clip(update, 2.0)
    assert update_norm(clipped) <= 2.0 and update_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(clipped["a"], torch.tensor([1.2, 0.0])) and torch.allclose(clipped["b"], torch.tensor([[0.0], [1.6]]))
    assert all(torch.equal(clip(update, 5.0)[k], update[k]) for k in update)  # within the bound: unchanged
    sent = {"a": torch.tensor([10.0, 10.0]), "b": torch.tensor([[1.0], [1.0]])}
    upload = {k: sent[k] + update[k] for k in update}
    back = clip_upload(upload, sent, 2.0)  # the change is clipped, not the weights
    assert update_norm({k: back[k] - sent[k] for k in back}) == pytest.approx(2.0, rel=1e-5)


def test_without_noise_the_dp_average_is_the_plain_mean_of_the_clipped_uploads():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}, {"w": torch.tensor([2.0, 1.0])}]
    average = DPAverage(clip_norm=1.0, noise_multiplier=0.0, seed=0)(states, weights=[100, 1, 1])  # weights ignored
    assert torch.equal(average["w"], torch.tensor([2.0, 3.0]))


def test_the_noise_on_the_mean_has_std_noise_multiplier_times_clip_over_n():
    n, clip_norm, z = 4, 2.0, 3.0
    states = [{"w": torch.zeros(200_000, dtype=torch.float64)} for _ in range(n)]
    noise = DPAverage(clip_norm, z, seed=1)(states)["w"]
    assert float(noise.std()) == pytest.approx(z * clip_norm / n, rel=0.01)
    assert abs(float(noise.mean())) < 0.01
    again = DPAverage(clip_norm, z, seed=1)(states)["w"]
    assert torch.equal(noise, again)  # seeded: a resumed run draws the same noise


def test_epsilon_is_the_accountants_and_grows_with_rounds():
    import dp_accounting
    from dp_accounting import rdp

    ours = Accountant(noise_multiplier=1.2, delta=1e-5, population=8, sampled=4)
    library = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    library.compose(dp_accounting.SampledWithoutReplacementDpEvent(8, 4, dp_accounting.GaussianDpEvent(0.6)), 10)
    assert ours.epsilon(10) == pytest.approx(library.get_epsilon(1e-5), rel=1e-9)
    values = [ours.epsilon(r) for r in (1, 5, 10, 25)]
    assert values == sorted(values) and values[0] < values[-1]
    everyone = Accountant(1.2, 1e-5, population=8, sampled=8)  # no sampling: no amplification
    assert everyone.epsilon(10) > ours.epsilon(10)
    assert Accountant(0.0, 1e-5, 8, 8).epsilon(1) == math.inf


def test_local_mode_uploads_nothing_unclipped():
    from fedrouter.engines.inprocess import InProcessTransport
    from fedrouter.methods.base import ClientContext, Message
    from fedrouter.methods.privacy import private_parts

    class Huge:
        def fit(self, msg, ctx):
            return Message({"w": msg.arrays["w"] + 100.0}, {"n_examples": 1})

        def upload_reference(self, msg):
            return msg.arrays

    privacy = load_config(None, {"method": "fedit", "privacy": {"mode": "local", "clip": 0.5, "noise_multiplier": 0.0}}).privacy
    sent = {0: Message({"w": torch.ones(3)}, {"round": 0})}
    _, client = private_parts(None, Huge(), privacy, seed=0)  # what `world.client_part` does under local DP
    transport = InProcessTransport(client, {0: ClientContext(0, None)}, progress=False)
    reply = transport.fit(sent)[0]
    assert update_norm({"w": reply.arrays["w"] - 1.0}) == pytest.approx(0.5, abs=1e-6)
    noisy = privatize_upload({"w": torch.ones(3) + 100.0}, {"w": torch.ones(3)}, 0.5, 1.0, torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy["w"] - 1.0, reply.arrays["w"] - 1.0)  # with noise: more than the clip


def test_the_centroid_noise_follows_its_clip():
    n, d = 2000, 4000
    x, labels = np.zeros((n, d)), np.zeros(n, dtype=int)  # every sum is pure noise
    stds = [float(noisy_centroids(x, labels, 1, c, 2.0, np.random.default_rng(3))[0].std()) for c in (1.0, 3.0)]
    # sum noise std z * clip, divided by a count of about n
    assert stds[0] == pytest.approx(2.0 * 1.0 / n, rel=0.05) and stds[1] == pytest.approx(2.0 * 3.0 / n, rel=0.05)
    big = np.full((5, 2), 10.0)
    exact, sizes = noisy_centroids(big, np.zeros(5, dtype=int), 1, 1.0, 0.0, np.random.default_rng(0))
    assert np.allclose(np.linalg.norm(exact, axis=1), 1.0)  # each embedding clipped to norm 1 before the mean
    assert sizes.tolist() == [5]  # no noise: the exact count
    # the sizes released are the noisy counts' (std z), never the exact ones; one at least
    _, noisy = noisy_centroids(np.zeros((400, 2)), np.repeat([0, 1], 200), 2, 1.0, 30.0, np.random.default_rng(1))
    assert noisy.tolist() != [200, 200] and noisy.min() >= 1 and noisy.dtype.kind == "i"


def test_a_budget_the_rounds_would_exceed_is_refused_before_any_work():
    with pytest.raises(FedrouterError, match="over target_epsilon"):
        load_config(None, {"method": "fedit", "rounds": 25, "privacy": {"mode": "central", "noise_multiplier": 0.5,
                                                                        "target_epsilon": 1.0}})
    fine = load_config(None, {"method": "fedit", "rounds": 2, "privacy": {"mode": "central", "noise_multiplier": 5.0,
                                                                         "target_epsilon": 10.0}})
    assert fine.privacy.target_epsilon == 10.0
    for method in ("flora", "ifca", "local", "fedlease"):
        with pytest.raises(FedrouterError, match="does not fold uploads by a mean"):
            load_config(None, {"method": method, "privacy": {"mode": "central"}})
    with pytest.raises(FedrouterError, match="robust aggregation"):
        load_config(None, {"method": "fedit", "method_options": {"aggregation": "median"}, "privacy": {"mode": "central"}})


@pytest.mark.parametrize("method, mode", [("fedit", "central"), ("fedrouter", "central"), ("fedsa", "local")])
def test_a_private_run_reports_epsilon_per_round_and_at_the_end(method, mode, tmp_path, tiny_overrides, tiny_model_dir):
    from fedrouter.cli import main

    from conftest import FEDROUTER_DP_OPTIONS

    privacy = {"privacy.mode": f'"{mode}"', "privacy.noise_multiplier": 1.0, "privacy.clip": 0.05,
               "privacy.centroid_noise_multiplier": 1.0,
               **({f"method_options.{k}": json.dumps(v) for k, v in FEDROUTER_DP_OPTIONS.items()} if method == "fedrouter" else {})}
    out = tmp_path / "run"
    args = [a for k, v in {**tiny_overrides, **privacy}.items() for a in ("--set", f"{k}={v}")]
    assert main(["run", "--quiet", "--method", method, "--out", str(out), *args]) == 0
    results = json.loads((out / "results.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] for r in rounds] == results["privacy"]["epsilon_per_round"]
    assert results["privacy"]["epsilon"] == rounds[-1]["epsilon"] and rounds[0]["epsilon"] < rounds[1]["epsilon"]
    if mode == "central":
        assert rounds[0]["clipped_updates"] == 2  # clip 0.05 is below both first-round updates' norms


# Issue 32: a run whose epsilon would not cover what it releases, or that the accountant cannot bound, is
# refused before any work, in one line naming the reason.
DP_REFUSED = {
    "fedrouter central, exact centroids": ({"method": "fedrouter", "privacy": {"mode": "central"}},
                                           "release its clients' centroids, assignment counts and router moments exactly"),
    "fedrouter-star local, exact centroids": ({"method": "fedrouter-star", "privacy": {"mode": "local"}},
                                              "set privacy.centroid_noise_multiplier"),
    "fedrouter-oracle sends task names": ({"method": "fedrouter-oracle",
                                           "privacy": {"mode": "central", "centroid_noise_multiplier": 4.0}},
                                          "true task names"),
    "fedex central, exact residual": ({"method": "fedex", "privacy": {"mode": "central"}}, "fedex releases each round's residual"),
    "fedex local, exact residual": ({"method": "fedex", "privacy": {"mode": "local"}}, "fedex releases each round's residual"),
    "fedalt central, a mean per client": ({"method": "fedalt", "privacy": {"mode": "central"}},
                                          "one release per client a round"),
    "fedalt local, a mean per client": ({"method": "fedalt", "privacy": {"mode": "local"}},
                                        "mean of the other clients' adapters"),
    "screen on clean updates": ({"method": "fedit", "update_norm_ratio": 3.0, "privacy": {"mode": "central"}},
                                "update_norm_ratio screens the clean updates"),
    "delta 1/n": ({"method": "fedit", "n_clients": 8, "privacy": {"mode": "central", "delta": 0.125}},
                  "delta 0.125 is at least 1/n_clients (1/8)"),
    "delta 1/examples": ({"method": "fedrouter", "train_per_client": 50,
                          "privacy": {"mode": "central", "centroid_noise_multiplier": 4.0, "delta": 0.05}},
                         "at least 1/train_per_client (1/50)"),
    "noise overflows": ({"method": "fedit", "privacy": {"mode": "central", "noise_multiplier": 1e300}},
                        "the accountant cannot compute epsilon for noise_multiplier 1e+300 (OverflowError"),
    "centroid noise overflows": ({"method": "fedrouter", "privacy": {"mode": "central", "centroid_noise_multiplier": 1e300}},
                                 "centroid_noise_multiplier 1e+300 (OverflowError"),
    "noise underflows, sampled": ({"method": "fedit", "client_fraction": 0.5,
                                   "privacy": {"mode": "central", "noise_multiplier": 1e-300}}, "(ZeroDivisionError"),
    "sampled, with a target": ({"method": "fedit", "client_fraction": 0.5,
                                "privacy": {"mode": "central", "noise_multiplier": 1e30, "target_epsilon": 1.0}},
                               "(ValueError: math domain error"),
}


@pytest.mark.parametrize("case", sorted(DP_REFUSED))
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the accountant's own division by zero, on the way to its error
def test_a_private_run_the_accountant_does_not_cover_is_refused_in_one_line(case):
    overrides, needle = DP_REFUSED[case]
    with pytest.raises(FedrouterError, match="^config: privacy: ") as refused:
        load_config(None, overrides)
    assert needle in str(refused.value) and "\n" not in str(refused.value)


def test_what_dp_does_cover_is_accepted():
    # local DP: the server screens only noised uploads (post-processing); FedRouter with noisy centroids
    assert load_config(None, {"method": "fedit", "update_norm_ratio": 3.0, "privacy": {"mode": "local"}}).update_norm_ratio == 3
    from conftest import FEDROUTER_DP_OPTIONS

    assert load_config(None, {"method": "fedrouter", "privacy": {"mode": "central", "centroid_noise_multiplier": 4.0},
                              "method_options": FEDROUTER_DP_OPTIONS})
    with pytest.raises(FedrouterError, match="n_local must be a number"):  # an "auto" K is chosen by the data
        load_config(None, {"method": "fedrouter", "privacy": {"mode": "central", "centroid_noise_multiplier": 4.0}})
    assert load_config(None, {"method": "fedit", "privacy": {"mode": "central", "noise_multiplier": 0.0}})  # epsilon inf


def test_a_fedrouter_dp_run_without_noisy_centroids_refuses_before_it_claims_anything(tmp_path, capsys):
    from conftest import one_error_line

    from fedrouter.cli import main

    out = tmp_path / "run"
    assert main(["run", "--quiet", "--method", "fedrouter", "--out", str(out), "--set", 'privacy.mode="central"']) == 2
    assert "privacy.centroid_noise_multiplier" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_an_infinite_epsilon_is_null_and_flagged_never_the_literal_infinity(tmp_path, tiny_overrides, tiny_model_dir):
    from fedrouter.engines.driver import epsilon_fields
    from fedrouter.experiment import run_experiment

    assert epsilon_fields(math.inf) == {"epsilon": None, "epsilon_infinite": True}
    assert epsilon_fields(2.5) == {"epsilon": 2.5, "epsilon_infinite": False}
    cfg = load_config(None, {**tiny_overrides, "method": "fedit", "privacy": {"mode": "central", "noise_multiplier": 0.0}})
    run_experiment(cfg, tmp_path / "run", progress=False)

    def strict(text: str):
        def refuse(constant):
            raise AssertionError(f"non-standard JSON constant {constant}")
        return json.loads(text, parse_constant=refuse)

    results = strict((tmp_path / "run" / "results.json").read_text())
    assert results["privacy"]["epsilon"] is None and results["privacy"]["epsilon_infinite"] is True
    assert results["privacy"]["epsilon_per_round"] == [None, None]
    rounds = [strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epsilon"], r["epsilon_infinite"]) for r in rounds] == [(None, True), (None, True)]
