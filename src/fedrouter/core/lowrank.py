"""LoRA algebra on adapter state dicts: the dense update an adapter applies, rank-wise stacking, and
truncation to a lower rank by SVD.

An adapter state dict holds, per adapted module `m`, "m.lora_A.weight" (r x in) and "m.lora_B.weight"
(out x r); the module's weight becomes W + scaling * B @ A with scaling = alpha / r.
"""

from __future__ import annotations

import torch

Adapter = dict[str, torch.Tensor]
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def modules(adapter: Adapter) -> list[str]:
    """The adapted modules' names, sorted; every module must have both an A and a B."""
    names = sorted(k[: -len(A_SUFFIX)] for k in adapter if k.endswith(A_SUFFIX))
    if len(names) * 2 != len(adapter) or any(m + B_SUFFIX not in adapter for m in names):
        raise ValueError("an adapter must hold exactly one lora_A and one lora_B per module")
    return names


def rank(adapter: Adapter) -> int:
    return adapter[modules(adapter)[0] + A_SUFFIX].shape[0]


def dense_update(adapter: Adapter, scaling: float) -> dict[str, torch.Tensor]:
    """{module: scaling * B @ A}: what the adapter adds to each module's weight."""
    return {m: scaling * (adapter[m + B_SUFFIX].double() @ adapter[m + A_SUFFIX].double()) for m in modules(adapter)}


def product_norms(adapter: Adapter) -> dict[str, torch.Tensor]:
    """{module: ||B @ A||_F} through the r x r Gram matrices, ||B A||_F^2 = sum((B^T B) * (A A^T)): never the
    out x in product, gigabytes per adapter on a real model. Differentiable, with a zero gradient where the
    product is zero (the square root's is infinite there)."""
    out = {}
    for m in modules(adapter):
        b, a = adapter[m + B_SUFFIX], adapter[m + A_SUFFIX]
        squared = ((b.T @ b) * (a @ a.T)).sum()
        positive = squared > 0
        out[m] = torch.where(positive, squared, torch.ones_like(squared)).sqrt() * positive
    return out


def scaled(adapter: Adapter, factor: float) -> Adapter:
    """Every matrix of `adapter` times `factor` (both factors: the product times factor ** 2), computed in
    float64, kept in each matrix's dtype."""
    return {name: (t.double() * factor).to(t.dtype) for name, t in adapter.items()}


def add_updates(*updates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module-wise sum of dense updates (modules missing from one update count as zero)."""
    out: dict[str, torch.Tensor] = {}
    for update in updates:
        for m, delta in update.items():
            out[m] = out[m] + delta if m in out else delta.clone()
    return out


def concat(adapters: list[Adapter], coefficients: list[float]) -> Adapter:
    """One adapter of rank sum(r_k) whose B @ A equals sum_k c_k * B_k @ A_k, for any real c_k (negative
    ones too: FedEx-LoRA's residual subtracts the averaged product). The A blocks are scaled by c_k (in
    float64, then stored in the inputs' dtype) and stacked along the rank (rows); the B blocks are
    concatenated along the rank (columns). Ranks may differ between adapters; the modules must not.
    """
    if not adapters or len(adapters) != len(coefficients):
        raise ValueError("need one coefficient per adapter, and at least one adapter")
    names = modules(adapters[0])
    if any(modules(a) != names for a in adapters[1:]):
        raise ValueError("adapters to stack adapt different modules")
    out: Adapter = {}
    for m in names:
        out[m + A_SUFFIX] = torch.cat(
            [a[m + A_SUFFIX].double() * c for a, c in zip(adapters, coefficients)], dim=0
        ).to(adapters[0][m + A_SUFFIX].dtype)
        out[m + B_SUFFIX] = torch.cat([a[m + B_SUFFIX] for a in adapters], dim=1)
    return out


def shapes_at_rank(shapes: dict[str, tuple[int, ...]], r: int) -> dict[str, tuple[int, ...]]:
    """An adapter's tensor shapes (name -> shape) at LoRA rank `r`: A becomes (r, in), B (out, r)."""
    return {name: (r, shape[1]) if name.endswith(A_SUFFIX) else (shape[0], r) for name, shape in shapes.items()}


def svd_factors(b: torch.Tensor, a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rank-`r` truncated SVD of the matrix b @ a as two factors, with the singular values split evenly.

    With b @ a = U S V^T (singular values descending): (U_r S_r^1/2, S_r^1/2 V_r^T, S), in float64, so
    that left @ right is the best rank-r approximation of b @ a in Frobenius norm (Eckart-Young) and
    left^T left = right right^T = diag(S_r). Computed through QR of the factors, never forming b @ a:
    b = Q_b R_b and a^T = Q_a R_a give b @ a = Q_b (R_b R_a^T) Q_a^T, so only the small core R_b R_a^T
    (at most k x k for an inner dimension k) is decomposed -- the cost grows with k, not with the matrix
    (a dense matrix d is b = d, a = identity). Beyond the rank b @ a has, the factors are zero.
    """
    b, a = b.double(), a.double()
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    kept = min(r, s.numel())
    root = s[:kept].sqrt()
    left = torch.zeros(b.shape[0], r, dtype=torch.float64)
    right = torch.zeros(r, a.shape[1], dtype=torch.float64)
    left[:, :kept] = (q_b @ u[:, :kept]) * root
    right[:kept] = root[:, None] * (vh[:kept] @ q_a.T)
    return left, right, s


def truncated(adapter: Adapter, r: int) -> Adapter:
    """An adapter of rank `r` whose B @ A is, module by module, the rank-`r` truncated SVD of the given
    adapter's B @ A (`svd_factors`), in the given adapter's dtype."""
    out: Adapter = {}
    for m in modules(adapter):
        b, a = adapter[m + B_SUFFIX], adapter[m + A_SUFFIX]
        left, right, _ = svd_factors(b, a, r)
        out[m + A_SUFFIX], out[m + B_SUFFIX] = right.to(a.dtype), left.to(b.dtype)
    return out


def rank_slice(adapter: Adapter, start: int, stop: int) -> Adapter:
    """Rank components start..stop-1 of every module: A's rows and B's columns (a truncation from 0)."""
    return {k: t[start:stop] if k.endswith(A_SUFFIX) else t[:, start:stop] for k, t in adapter.items()}


def pad_rank(adapter: Adapter, r: int) -> Adapter:
    """The adapter zero-padded to rank `r`: zero rows under A, zero columns right of B (the same product)."""
    out = {}
    for k, t in adapter.items():
        missing = r - (t.shape[0] if k.endswith(A_SUFFIX) else t.shape[1])
        out[k] = torch.nn.functional.pad(t, (0, 0, 0, missing) if k.endswith(A_SUFFIX) else (0, missing))
    return out


def stack(adapters: list[Adapter], weights: list[float], scalings: list[float]) -> Adapter:
    """FLoRA's stacking: one adapter of rank sum(r_k) whose B @ A equals sum_k p_k * s_k * B_k @ A_k.

    p_k = weights[k] / sum(weights), s_k = scalings[k] (the client's alpha / r_k); see `concat`. The
    result keeps the inputs' dtype.
    """
    if not adapters or len(adapters) != len(weights) or len(adapters) != len(scalings):
        raise ValueError("need one weight and one scaling per adapter, and at least one adapter")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return concat(adapters, [w / total * s for w, s in zip(weights, scalings)])
