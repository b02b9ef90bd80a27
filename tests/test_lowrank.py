"""LoRA algebra: dense updates and FLoRA's stacking, exact on small tensors."""

import pytest
import torch

from fedrouter.core import lowrank

M1, M2 = "layer.0.q_proj", "layer.0.v_proj"


def adapter(r: int, seed: int, d_in: int = 5, d_out: int = 3, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in (M1, M2):
        out[m + lowrank.A_SUFFIX] = torch.randn(r, d_in, generator=g, dtype=dtype)
        out[m + lowrank.B_SUFFIX] = torch.randn(d_out, r, generator=g, dtype=dtype)
    return out


def test_dense_update_is_scaled_b_times_a():
    a = adapter(2, 0)
    upd = lowrank.dense_update(a, 0.5)
    assert set(upd) == {M1, M2}
    expected = 0.5 * a[M1 + lowrank.B_SUFFIX].double() @ a[M1 + lowrank.A_SUFFIX].double()
    assert torch.allclose(upd[M1], expected)


def test_product_norms_are_the_dense_products_norms_and_safe_at_zero():
    a = {k: t.clone().requires_grad_(True) for k, t in adapter(3, 1, d_in=7, d_out=4).items()}
    norms = lowrank.product_norms(a)
    for m, delta in lowrank.dense_update(a, 1.0).items():
        torch.testing.assert_close(norms[m], torch.linalg.matrix_norm(delta), rtol=1e-12, atol=0)
    sum(norms.values()).backward()  # the gradient of the dense form, too
    dense = {k: t.detach().clone().requires_grad_(True) for k, t in a.items()}
    sum(torch.linalg.matrix_norm(d) for d in lowrank.dense_update(dense, 1.0).values()).backward()
    for k in a:
        torch.testing.assert_close(a[k].grad, dense[k].grad, rtol=1e-10, atol=1e-12)
    zero = {k: (torch.zeros_like(t) if k.endswith(lowrank.B_SUFFIX) else t).requires_grad_(True) for k, t in adapter(2, 2).items()}
    total = sum(lowrank.product_norms(zero).values())  # a fresh LoRA: B = 0
    total.backward()
    assert float(total.detach()) == 0.0 and all(torch.isfinite(t.grad).all() and t.grad.abs().sum() == 0 for t in zero.values())


def test_stack_with_mixed_ranks_equals_weighted_sum_of_products():
    ranks, weights = [2, 4, 8], [3.0, 1.0, 4.0]
    adapters = [adapter(r, i) for i, r in enumerate(ranks)]
    scalings = [16 / r for r in ranks]
    stacked = lowrank.stack(adapters, weights, scalings)
    assert lowrank.rank(stacked) == sum(ranks)
    for m in (M1, M2):
        product = stacked[m + lowrank.B_SUFFIX] @ stacked[m + lowrank.A_SUFFIX]
        expected = sum(w / sum(weights) * s * a[m + lowrank.B_SUFFIX] @ a[m + lowrank.A_SUFFIX]
                       for a, w, s in zip(adapters, weights, scalings))
        assert torch.allclose(product, expected, atol=1e-6, rtol=0)
    # float32 adapters (what clients send) stay float32 and agree to float32 precision
    stacked32 = lowrank.stack([{k: v.float() for k, v in a.items()} for a in adapters], weights, scalings)
    assert stacked32[M1 + lowrank.A_SUFFIX].dtype == torch.float32
    assert torch.allclose(stacked32[M1 + lowrank.B_SUFFIX] @ stacked32[M1 + lowrank.A_SUFFIX],
                          (stacked[M1 + lowrank.B_SUFFIX] @ stacked[M1 + lowrank.A_SUFFIX]).float(), rtol=1e-5, atol=1e-5)


def test_stacking_is_not_averaging_a_and_b():
    # Averaging A and B separately gives cross terms; stacking does not (the reason FLoRA stacks).
    a, b = adapter(2, 1), adapter(2, 2)
    stacked = lowrank.stack([a, b], [1, 1], [1.0, 1.0])
    exact = 0.5 * (a[M1 + lowrank.B_SUFFIX] @ a[M1 + lowrank.A_SUFFIX] + b[M1 + lowrank.B_SUFFIX] @ b[M1 + lowrank.A_SUFFIX])
    averaged = (0.5 * (a[M1 + lowrank.B_SUFFIX] + b[M1 + lowrank.B_SUFFIX])) @ (0.5 * (a[M1 + lowrank.A_SUFFIX] + b[M1 + lowrank.A_SUFFIX]))
    assert torch.allclose(stacked[M1 + lowrank.B_SUFFIX] @ stacked[M1 + lowrank.A_SUFFIX], exact, atol=1e-6)
    assert not torch.allclose(averaged, exact, atol=1e-3)


def test_add_updates_sums_modulewise():
    u = {M1: torch.ones(2, 2)}
    v = {M1: torch.full((2, 2), 2.0), M2: torch.eye(2)}
    total = lowrank.add_updates(u, v)
    assert torch.equal(total[M1], torch.full((2, 2), 3.0)) and torch.equal(total[M2], torch.eye(2))
    assert torch.equal(u[M1], torch.ones(2, 2))  # inputs untouched


def test_bad_adapters_are_refused():
    a = adapter(2, 0)
    with pytest.raises(ValueError):
        lowrank.modules({M1 + lowrank.A_SUFFIX: a[M1 + lowrank.A_SUFFIX]})
    with pytest.raises(ValueError):
        lowrank.stack([a], [0.0], [1.0])
    with pytest.raises(ValueError):
        lowrank.stack([a, {k: v for k, v in a.items() if k.startswith(M1)}], [1, 1], [1, 1])
