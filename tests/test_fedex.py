"""FedEx-LoRA: exact aggregation on small tensors (the server's residual and what the base absorbs), each
residual merged once by every client, and what the method refuses."""

from __future__ import annotations

import pytest
import torch

from fedrouter.config import load_config
from fedrouter.core import lowrank
from fedrouter.errors import FedrouterError
from fedrouter.methods import fedex, options_for
from fedrouter.methods.base import ClientContext, Message, MethodSetup
from fedrouter.methods.common import unpack_under

M1, M2 = "layer.0.q_proj", "layer.0.v_proj"
R, D_IN, D_OUT, S = 2, 5, 3, 2.0  # rank, module sizes, LoRA scaling alpha / r


def _adapter(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for m in (M1, M2)
            for name, shape in ((m + lowrank.A_SUFFIX, (R, D_IN)), (m + lowrank.B_SUFFIX, (D_OUT, R)))}


def _reply(adapter: dict, n: int, scaling: float = S) -> Message:
    return Message(adapter, {"n_examples": n, "loss": 1.0, "tokens": 1, "train_s": 0.0, "scaling": scaling})


def _server(n_clients: int = 3) -> fedex.Server:
    return fedex.Server(MethodSetup(0, 3), _adapter(100), list(range(n_clients)))


def _product(adapter: dict, m: str) -> torch.Tensor:
    return adapter[m + lowrank.B_SUFFIX].double() @ adapter[m + lowrank.A_SUFFIX].double()


def _mean_of_products(uploads: dict[int, dict], counts: dict[int, int], m: str) -> torch.Tensor:
    total = sum(counts.values())
    return sum(counts[c] / total * S * _product(uploads[c], m) for c in uploads)


def test_after_each_round_the_global_model_is_the_mean_of_the_clients_models():
    server, counts = _server(), {0: 1, 1: 2, 2: 5}  # unequal example counts: p = 1/8, 2/8, 5/8
    absorbed = {m: torch.zeros(D_OUT, D_IN, dtype=torch.float64) for m in (M1, M2)}  # base + residuals so far
    for round_idx in range(2):
        server.configure_fit(round_idx, [0, 1, 2])
        uploads = {c: _adapter(10 * round_idx + c) for c in counts}
        server.aggregate_fit(round_idx, {c: _reply(uploads[c], counts[c]) for c in counts})
        g = server.global_adapter
        for name in g:  # A and B are averaged by the example weights (FedIT)
            expected = sum(counts[c] / 8 * uploads[c][name].double() for c in counts)
            assert torch.allclose(g[name].double(), expected, atol=1e-6)
        merged = server.merged_update()
        for m in (M1, M2):
            # every client trained from base + earlier residuals (`absorbed`) + its own s * B_k A_k
            clients_mean = absorbed[m] + _mean_of_products(uploads, counts, m)
            assert torch.allclose(merged[m] + S * _product(g, m), clients_mean, atol=1e-5, rtol=0)
            # the base took exactly this round's residual on top of the earlier ones
            residual = _mean_of_products(uploads, counts, m) - S * _product(g, m)
            assert torch.allclose(merged[m] - absorbed[m], residual, atol=1e-5, rtol=0)
            assert residual.abs().max() > 1e-2  # FedIT's mean of A and B alone would have missed it
            absorbed[m] = merged[m].clone()
    # the saved file is the model after the last round: base + residuals + s * B̄ Ā
    (saved,) = server.tensor_files().values()
    for m in (M1, M2):
        assert saved[m].dtype == torch.float32
        assert torch.allclose(saved[m].double(), absorbed[m] + S * _product(server.global_adapter, m), atol=1e-6)


def test_the_residual_travels_factored_and_the_bytes_count_it():
    server = _server()
    first = server.configure_fit(0, [0, 1, 2])
    adapter_bytes = sum(t.numel() * 4 for t in _adapter(0).values())
    assert all(msg.nbytes() == adapter_bytes for msg in first.values())  # nothing merged yet: the adapter only
    server.aggregate_fit(0, {c: _reply(_adapter(c), c + 1) for c in range(3)})
    (msg,) = server.configure_fit(1, [0]).values()
    factors = unpack_under(msg.arrays, fedex.RESIDUALS)
    assert lowrank.rank({k.split("/", 1)[1]: v for k, v in factors.items()}) == (3 + 1) * R  # 3 clients + the average
    assert msg.nbytes() == adapter_bytes + 2 * (3 + 1) * R * (D_IN + D_OUT) * 4


class FakeBench:
    """Records the base update each training and evaluation ran on; training adds a client-specific step."""

    def __init__(self, client_id: int):
        self.client_id, self.n_train, self.bases = client_id, 4, []

    def lora_scaling(self, rank=None):
        return S

    def train(self, adapter, round_idx, *, base_update=None, **_):
        self.bases.append(base_update)
        step = _adapter(1000 + 10 * round_idx + self.client_id)
        stats = type("Stats", (), {"loss": 1.0, "tokens": 1, "seconds": 0.0})
        return {k: v + 0.5 * step[k] for k, v in adapter.items()}, stats

    def evaluate(self, adapter, split="test", *, base_update=None):
        self.bases.append(base_update)
        return {"n": 0}


def _same(update: dict | None, expected: dict) -> bool:
    return set(update or {}) == set(expected) and all(torch.equal(update[m], expected[m]) for m in expected)


def test_every_client_merges_each_residual_once_whatever_it_missed():
    server = _server()
    part = fedex.Client(MethodSetup(0, 3))
    ctx = {c: ClientContext(c, FakeBench(c)) for c in range(3)}

    def round_(round_idx, selected, lost=(), dropped=()):
        """`lost`: the message never reached the client (an injected failure); `dropped`: it trained (and
        merged) but its reply was not accepted."""
        sent = server.configure_fit(round_idx, selected)
        replies = {c: part.fit(msg, ctx[c]) for c, msg in sent.items() if c not in lost}
        server.aggregate_fit(round_idx, {c: r for c, r in replies.items() if c not in dropped})

    round_(0, [0, 1, 2])
    round_(1, [0, 1], lost=[1])   # 1 never merged residual 0: it is sent again
    round_(2, [0, 1, 2], dropped=[2])  # 2 merged residuals 0-1, then its reply was dropped: sent again, skipped
    before = server.merged_update()
    # each training ran on exactly the residuals of the rounds before it
    first_two = lowrank.add_updates(*(lowrank.dense_update(server.residuals.items[t], 1.0) for t in (0, 1)))
    assert ctx[0].workbench.bases[0] is None and _same(ctx[0].workbench.bases[2], first_two)
    assert _same(ctx[1].workbench.bases[-1], first_two)  # 1 caught up on residuals 0 and 1 at once
    evaluation = server.configure_evaluate([0, 1, 2])
    for c, msg in evaluation.items():
        part.evaluate(msg, ctx[c])
        assert _same(ctx[c].workbench.bases[-1], before)  # all three rounds' residuals, none twice
        assert ctx[c].state["merged_count"] == 3
    # client 2 was sent residuals 0-2 again (its reply was dropped), client 0 only the newest
    assert sorted({k.split("/")[1] for k in evaluation[2].arrays if k.startswith(fedex.RESIDUALS)}) == ["0", "1", "2"]
    assert sorted({k.split("/")[1] for k in evaluation[0].arrays if k.startswith(fedex.RESIDUALS)}) == ["2"]
    # a later round sends the merged clients nothing but the adapter
    assert all(not unpack_under(m.arrays, fedex.RESIDUALS) for m in server.configure_fit(3, [0, 1, 2]).values())


def test_clients_must_report_one_positive_scaling():
    server = _server()
    server.configure_fit(0, [0, 1])
    with pytest.raises(FedrouterError, match="not one positive number"):
        server.aggregate_fit(0, {0: _reply(_adapter(0), 1), 1: _reply(_adapter(1), 1, scaling=4.0)})
    with pytest.raises(FedrouterError, match="not one positive number"):
        server.aggregate_fit(0, {0: _reply(_adapter(0), 1, scaling=float("nan"))})
    with pytest.raises(FedrouterError, match="not one positive number"):
        server.aggregate_fit(0, {0: _reply(_adapter(0), 1, scaling=[S])})


def test_dp_is_refused_in_one_line_and_the_method_has_no_options():
    for mode in ("central", "local"):
        with pytest.raises(FedrouterError, match="fedex releases each round's residual") as refused:
            load_config(None, {"method": "fedex", "privacy": {"mode": mode}})
        assert "\n" not in str(refused.value)
    with pytest.raises(FedrouterError, match="unknown method option"):
        options_for("fedex", {"server_opt": "fedadam"})  # a server optimizer would break the exactness
