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

    class Huge:
        def fit(self, msg, ctx):
            return Message({"w": msg.arrays["w"] + 100.0}, {"n_examples": 1})

        def upload_reference(self, msg):
            return msg.arrays

    privacy = load_config(None, {"method": "fedit", "privacy": {"mode": "local", "clip": 0.5, "noise_multiplier": 0.0}}).privacy
    sent = {0: Message({"w": torch.ones(3)}, {"round": 0})}
    transport = InProcessTransport(Huge(), {0: ClientContext(0, None)}, progress=False, privacy=privacy)
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

    privacy = {"privacy.mode": f'"{mode}"', "privacy.noise_multiplier": 1.0, "privacy.clip": 0.05,
               "privacy.centroid_noise_multiplier": 1.0}
    out = tmp_path / "run"
    args = [a for k, v in {**tiny_overrides, **privacy}.items() for a in ("--set", f"{k}={v}")]
    assert main(["run", "--quiet", "--method", method, "--out", str(out), *args]) == 0
    results = json.loads((out / "results.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] for r in rounds] == results["privacy"]["epsilon_per_round"]
    assert results["privacy"]["epsilon"] == rounds[-1]["epsilon"] and rounds[0]["epsilon"] < rounds[1]["epsilon"]
    if mode == "central":
        assert rounds[0]["clipped_updates"] == 2  # clip 0.05 is below both first-round updates' norms
