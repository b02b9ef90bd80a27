"""FlexLoRA's defining properties on small tensors: the server averages the clients' full-size products,
and each client trains from the truncated SVD of that average at its own rank (Eckart-Young error)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fedrouter.config import load_config
from fedrouter.core import lowrank
from fedrouter.errors import FedrouterError
from fedrouter.methods import flexlora
from fedrouter.methods.base import ClientContext, MethodSetup

ALPHA, DEFAULT_RANK = 8.0, 4
SHAPES = {"p": (6, 5), "q": (7, 6)}  # module -> (out, in)


def _lora(r: int, seed: int, zero_b: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d_out, d_in) in SHAPES.items():
        out[m + lowrank.A_SUFFIX] = torch.randn(r, d_in, generator=g)
        out[m + lowrank.B_SUFFIX] = torch.zeros(d_out, r) if zero_b else torch.randn(d_out, r, generator=g)
    return out


class RankedWorkbench:
    """A client's workbench with LoRA ranks: records the adapter it trains from and the update it evaluates
    on; returns a fixed trained adapter."""

    def __init__(self, trained: dict, n_train: int):
        self.trained, self.n_train = trained, n_train
        self.started_from = None
        self.evaluated_on = None

    def lora_rank(self):
        return DEFAULT_RANK

    def lora_scaling(self, rank=None):
        return ALPHA / (rank or DEFAULT_RANK)

    def initial_adapter(self, rank=None):
        return _lora(rank or DEFAULT_RANK, 100 + (rank or DEFAULT_RANK), zero_b=True)

    def train(self, adapter, round_idx, **_):
        self.started_from = adapter
        return self.trained, SimpleNamespace(loss=1.0, tokens=10, seconds=0.0)

    def evaluate(self, adapter, split="test", *, base_update=None):
        self.evaluated_on = base_update
        return {"rouge1": 0.0}


def _dense(adapter: dict, scaling: float) -> dict:
    return lowrank.dense_update(adapter, scaling)


def _truncation(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(best rank-r approximation, its Frobenius error) from the dense SVD, by hand."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r], s[r:].pow(2).sum().sqrt()


@pytest.mark.parametrize("r", [2, 4])
def test_svd_factors_are_the_truncated_svd_with_the_eckart_young_error(r):
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    left, right, s = lowrank.svd_factors(b, a, r)
    best, error = _truncation(b @ a, r)
    assert torch.allclose(left @ right, best, atol=1e-10)
    assert math.isclose(float(torch.linalg.norm(b @ a - left @ right)), float(error), rel_tol=1e-9)
    full = torch.linalg.svdvals(b @ a)  # rank 5 at most: the inner dimension
    assert torch.allclose(s, full[: s.numel()], atol=1e-10) and float(full[s.numel():].abs().max()) < 1e-10
    # S split evenly: both factors carry S_r^1/2, so left^T left = right right^T = diag(S_r)
    assert torch.allclose(left.T @ left, torch.diag(s[:r]), atol=1e-10)
    assert torch.allclose(right @ right.T, torch.diag(s[:r]), atol=1e-10)


def test_svd_factors_beyond_the_rank_are_exact_and_zero_padded():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(2, 7, generator=g, dtype=torch.float64)
    left, right, _ = lowrank.svd_factors(b, a, 4)
    assert left.shape == (6, 4) and right.shape == (4, 7)
    assert torch.allclose(left @ right, b @ a, atol=1e-10)
    assert not left[:, 2:].any() and not right[2:].any()


def _round(server, round_idx, ids, trained, n_train):
    """One round: the server's messages, each client's fit, the server's aggregation. Returns the
    messages and the clients' workbenches."""
    sent = server.configure_fit(round_idx, ids)
    client = flexlora.Client(MethodSetup(0, 2))
    wbs, replies = {}, {}
    for cid in ids:
        wbs[cid] = RankedWorkbench(trained[cid], n_train[cid])
        replies[cid] = client.fit(sent[cid], ClientContext(cid, wbs[cid]))
        got = {name: tuple(t.shape) for name, t in replies[cid].arrays.items()}
        assert got == server.expected_upload(cid, sent[cid])
    server.aggregate_fit(round_idx, replies)
    return sent, wbs


def test_the_server_averages_products_and_gives_each_client_its_own_truncation():
    ranks = (2, 3)
    initial = _lora(DEFAULT_RANK, 0, zero_b=True)
    server = flexlora.Server(MethodSetup(0, 3, client_ranks=ranks), initial, [0, 1, 2])
    trained = {c: _lora(ranks[c % 2], 10 + c) for c in range(3)}
    n_train = {0: 5, 1: 2, 2: 9}
    sent, wbs = _round(server, 0, [0, 1, 2], trained, n_train)
    # round 0: nothing global yet; each client starts from the run's initial adapter of its own rank
    assert all(m.nbytes() == 0 for m in sent.values())
    for c in range(3):
        assert sent[c].config["rank"] == ranks[c % 2]
        want = wbs[c].initial_adapter(rank=ranks[c % 2])
        assert all(torch.equal(wbs[c].started_from[k], want[k]) for k in want)
    # the global update is the example-weighted mean of s_k B_k A_k, by hand
    total = sum(n_train.values())
    by_hand = lowrank.add_updates(*({m: d * n_train[c] / total for m, d in _dense(trained[c], ALPHA / ranks[c % 2]).items()}
                                    for c in range(3)))
    merged = server.global_update()
    assert set(merged) == set(SHAPES)
    for m in SHAPES:
        assert torch.allclose(merged[m], by_hand[m], rtol=1e-5, atol=1e-5)
    files = server.tensor_files()["merged_update.safetensors"]
    assert all(torch.equal(files[m], merged[m].float()) for m in SHAPES)

    # round 1: each client trains from s_k B A = the rank-r_k truncated SVD of the global update
    sent, wbs = _round(server, 1, [0, 1], {0: trained[0], 1: trained[1]}, n_train)
    for c in (0, 1):
        r = ranks[c]
        d_sum = sum(d_out + d_in for d_out, d_in in SHAPES.values())
        assert sent[c].nbytes() == 4 * r * d_sum  # the client's own rank, both factors, float32
        start = wbs[c].started_from
        assert lowrank.rank(start) == r
        for m in SHAPES:
            best, error = _truncation(merged[m], r)
            product = _dense(start, ALPHA / r)[m]
            assert torch.allclose(product, best, rtol=1e-4, atol=1e-5)
            assert math.isclose(float(torch.linalg.norm(merged[m] - product)), float(error), rel_tol=1e-4)
    # the two ranks kept different shares of the update, each the share of its leading singular values
    report = server.report({})["flexlora"]
    assert report["client_ranks"] == {"0": 2, "1": 3, "2": 2} and report["stacked_rank_per_round"] == [7, 5]
    spectra = [torch.linalg.svdvals(d) for d in server.global_update().values()]
    for r in ranks:
        share = sum(float(s[:r].pow(2).sum()) for s in spectra) / sum(float(s.pow(2).sum()) for s in spectra)
        assert math.isclose(report["energy_kept_by_rank"][str(r)], share, rel_tol=1e-9)


def test_a_client_above_the_global_rank_keeps_every_direction_trainable():
    initial = _lora(DEFAULT_RANK, 0, zero_b=True)
    server = flexlora.Server(MethodSetup(0, 2, client_ranks=(1, 3)), initial, [0, 1])
    _round(server, 0, [0], {0: _lora(1, 7)}, {0: 4})  # only the rank-1 client took part: the global has rank 1
    merged = server.global_update()
    sent, wbs = _round(server, 1, [1], {1: _lora(3, 8)}, {1: 4})
    start, fresh = wbs[1].started_from, wbs[1].initial_adapter(rank=3)
    for m in SHAPES:
        b, a = start[m + lowrank.B_SUFFIX], start[m + lowrank.A_SUFFIX]
        assert not b[:, 1:].any()  # nothing to carry beyond rank 1 ...
        assert torch.equal(a[1:], fresh[m + lowrank.A_SUFFIX][1:])  # ... but A's rows there are a fresh LoRA's
        assert a[0].abs().sum() > 0 and not torch.equal(a[0], fresh[m + lowrank.A_SUFFIX][0])
    # so the product is still the global update's (rank 1: exactly)
    assert all(torch.allclose(_dense(start, ALPHA / 3)[m], merged[m], rtol=1e-4, atol=1e-5) for m in SHAPES)


def test_clients_evaluate_on_the_full_global_update():
    initial = _lora(DEFAULT_RANK, 0, zero_b=True)
    server = flexlora.Server(MethodSetup(0, 2, client_ranks=(2,)), initial, [0, 1, 2])
    _round(server, 0, [0, 1, 2], {c: _lora(2, 20 + c) for c in range(3)}, {0: 1, 1: 1, 2: 1})
    merged = server.global_update()
    assert all(int(torch.linalg.matrix_rank(d)) == min(6, *d.shape) for d in merged.values())  # above every rank 2
    wb = RankedWorkbench({}, 1)
    flexlora.Client(MethodSetup(0, 2)).evaluate(server.configure_evaluate([0])[0], ClientContext(0, wb))
    assert all(torch.allclose(wb.evaluated_on[m], merged[m], atol=1e-12) for m in SHAPES)


def test_the_config_takes_client_ranks_and_refuses_dp_in_one_line():
    assert load_config(None, {"method": "flexlora", "lora": {"client_ranks": [2, 4]}}).lora.client_ranks == [2, 4]
    for mode in ("central", "local"):
        with pytest.raises(FedrouterError) as refused:
            load_config(None, {"method": "flexlora", "privacy": {"mode": mode}})
        assert "averages the products" in str(refused.value) and "\n" not in str(refused.value)
