"""HetLoRA's defining properties on small tensors: truncation down, rank self-pruning, zero-padded
sparsity-weighted aggregation, the upload the server expects, and DP refused in one line."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from fedrouter.config import load_config
from fedrouter.errors import FedrouterError
from fedrouter.methods import hetlora
from fedrouter.methods.base import ClientContext, Message, MethodSetup

A, B = "m.lora_A.weight", "m.lora_B.weight"
IN, OUT = 3, 5


def _adapter(r: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(r, IN, generator=g), B: torch.randn(OUT, r, generator=g)}


def _server(ranks=(2, 4), options=None, base_rank=4):
    setup = MethodSetup(0, 3, {**hetlora.OPTIONS, **(options or {})}, client_ranks=ranks)
    return hetlora.Server(setup, _adapter(base_rank, 0), [0, 1])


def _reply(adapter, pruned=False):
    return Message(dict(adapter), {"n_examples": 10, "loss": 1.0, "tokens": 5, "train_s": 0.1, "pruned": pruned})


def test_the_client_receives_the_truncation_of_the_global_adapter_at_its_rank():
    server = _server(ranks=(2, 4))
    server.global_adapter = _adapter(4, 1)
    sent = server.configure_fit(0, [0, 1])
    assert sent[0].config["rank"] == 2 and sent[1].config["rank"] == 4
    assert sent[0].arrays[A].shape == (2, IN) and sent[0].arrays[B].shape == (OUT, 2)
    # the rank-2 client's update at scaling alpha / 2 is the global truncation's at alpha / 4, exactly
    alpha = 16
    got = alpha / 2 * sent[0].arrays[B].double() @ sent[0].arrays[A].double()
    want = alpha / 4 * server.global_adapter[B][:, :2].double() @ server.global_adapter[A][:2].double()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sent[1].arrays[A], server.global_adapter[A])  # the top rank gets it all


def test_zero_padded_aggregation_is_the_norm_weighted_sum():
    server = _server(ranks=(2, 4))
    small, big = _adapter(2, 2), _adapter(4, 3)
    server.aggregate_fit(0, {0: _reply(small), 1: _reply(big)})
    # by hand: the rank-2 upload back at the global scaling (factors times sqrt(4 / 2)), zero-padded to rank 4
    up = {k: t * math.sqrt(2) for k, t in small.items()}
    padded = {A: torch.cat([up[A], torch.zeros(2, IN)]), B: torch.cat([up[B], torch.zeros(OUT, 2)], dim=1)}
    s0 = torch.linalg.matrix_norm(up[B] @ up[A]).item()
    s1 = torch.linalg.matrix_norm(big[B] @ big[A]).item()
    w0, w1 = s0 / (s0 + s1), s1 / (s0 + s1)
    for k in (A, B):
        torch.testing.assert_close(server.global_adapter[k], w0 * padded[k] + w1 * big[k])
    assert server.weights == pytest.approx({0: w0, 1: w1})
    assert server.global_adapter[A][2:].abs().sum() > 0  # the tail comes from the rank-4 client alone


def test_the_server_expects_each_clients_current_rank_and_tracks_its_pruning():
    server = _server(ranks=(4, 4), options={"decay": 0.5})
    sent = server.configure_fit(0, [0, 1])
    assert server.expected_upload(0, sent[0]) == {A: (4, IN), B: (OUT, 4)}
    server.aggregate_fit(0, {0: _reply(_adapter(4, 4), pruned=True), 1: _reply(_adapter(4, 5))})
    assert server.ranks == {0: 2, 1: 4}
    sent = server.configure_fit(1, [0, 1])
    assert server.expected_upload(0, sent[0]) == {A: (2, IN), B: (OUT, 2)}
    assert sent[0].arrays[A].shape == (2, IN) and server.expected_upload(1, sent[1]) == {A: (4, IN), B: (OUT, 4)}


def test_a_pruned_tail_never_reaches_the_global_adapter():
    server = _server(ranks=(4,), options={"decay": 0.5})
    server.client_ids = [0]
    server.aggregate_fit(0, {0: _reply(_adapter(4, 6), pruned=True)})
    assert server.global_adapter[A][2:].abs().sum() == 0 and server.global_adapter[B][:, 2:].abs().sum() == 0


def test_a_pruned_flag_that_is_not_a_bool_is_one_line():
    server = _server()
    with pytest.raises(FedrouterError, match="client 0 sent pruned 'yes'"):
        server.aggregate_fit(0, {0: _reply(_adapter(2, 1), pruned="yes"), 1: _reply(_adapter(4, 2))})


@dataclass
class _Stats:
    loss: float = 1.0
    tokens: int = 3
    seconds: float = 0.1


class _Bench:
    """Trains to a fixed adapter and keeps the penalty it was given."""

    n_train = 8

    def __init__(self, trained):
        self.trained, self.penalty = trained, None

    def train(self, adapter, round_idx, *, penalty=None, **_):
        self.start, self.penalty = adapter, penalty
        return self.trained, _Stats()


def _tail_ratio_adapter(tail_scale: float) -> dict:
    """Rank 4 with A = I and B diagonal, so ||B A|| over some ranks is the root of their squared scales."""
    b = torch.zeros(OUT, 4)
    b[range(4), range(4)] = torch.tensor([1.0, 1.0, 1.0, tail_scale])
    return {A: torch.eye(4), B: b}


@pytest.mark.parametrize("tail, prunes", [(0.05, True), (0.5, False)])
def test_self_pruning_follows_the_tail_norm_against_the_threshold(tail, prunes):
    # kept ranks' product norm sqrt(3); with decay 0.75 the tail is the last rank, threshold 0.1: cut below 0.173
    client = hetlora.Client(MethodSetup(0, 3, {**hetlora.OPTIONS, "decay": 0.75, "prune_threshold": 0.1}))
    bench = _Bench(_tail_ratio_adapter(tail))
    reply = client.fit(Message(_tail_ratio_adapter(1.0), {"round": 0, "rank": 4, "global_rank": 4}), ClientContext(0, bench))
    assert reply.config["pruned"] is prunes
    assert hetlora.should_prune(bench.trained, 3, 0.1) is (tail < 0.1 * math.sqrt(3))


def test_the_penalty_is_the_tail_products_norm_and_a_rank_one_client_never_prunes():
    live = {k: t.clone().requires_grad_(True) for k, t in _adapter(4, 7).items()}
    want = torch.linalg.matrix_norm(live[B][:, 3:] @ live[A][3:])
    torch.testing.assert_close(hetlora.tail_penalty(live, 3).float(), want)
    hetlora.tail_penalty(live, 3).backward()
    assert live[A].grad[:3].abs().sum() == 0 and live[A].grad[3:].abs().sum() > 0  # only the tail is pushed
    assert hetlora.pruned_rank(1, 0.5) == 1 and hetlora.pruned_rank(16, 0.9) == 14 and hetlora.pruned_rank(4, 0.99) == 3


def test_options_and_dp_are_refused_in_one_line():
    with pytest.raises(FedrouterError, match="decay must be in"):
        load_config(None, {"method": "hetlora", "method_options": {"decay": 1.0}})
    with pytest.raises(FedrouterError) as exc:
        load_config(None, {"method": "hetlora", "lora.client_ranks": [2, 4], "privacy": {"mode": "central"}})
    assert "weights each upload by the norm" in str(exc.value) and "\n" not in str(exc.value)
    assert load_config(None, {"method": "hetlora", "lora.client_ranks": [2, 4]}).lora.client_ranks == [2, 4]
