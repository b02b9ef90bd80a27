"""FedRouter's options (``method_options``), their checks, and what DP allows of them: embedder ("minilm",
"base": the base model's mean-pooled last hidden state, or an encoder id/path); n_local, n_global (K of a
client's split and of the server's prototypes: an int or "auto", K = 1 included, up to k_max); router (own
tests among the client's clusters, "local", or all, "global"; generalization and serving use all);
global_router ("discriminant" or "prototype", router.py); assign ("example": each example to its nearest
cluster centre, one more exchange; "sub-cluster": where its sub-cluster went, the paper's form); mixed_batch
(one generate call for rows routed to different adapters).
"""

from __future__ import annotations

from fedrouter.core.cluster import AUTO
from fedrouter.methods.common import require
from fedrouter.methods.fedrouter.router import DISCRIMINANT, PROTOTYPE

EXAMPLE, SUB_CLUSTER = "example", "sub-cluster"
OPTIONS = {"embedder": "minilm", "n_local": AUTO, "n_global": AUTO, "k_max": 12, "router": "local",
           "global_router": DISCRIMINANT, "assign": EXAMPLE, "mixed_batch": False}
LOOSE = {"n_local", "n_global"}  # "auto" or a positive integer: check_options decides
CHOICES = {"router": ("local", "global"), "global_router": (DISCRIMINANT, PROTOTYPE), "assign": (EXAMPLE, SUB_CLUSTER)}


def check_options(method: str, opts: dict) -> None:
    for key in ("n_local", "n_global"):
        value = opts[key]
        require(value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), method,
                f"{key} must be a positive integer or 'auto', got {value!r}")
    require(opts["k_max"] >= 1, method, f"k_max must be at least 1, got {opts['k_max']!r}")
    for key, allowed in CHOICES.items():
        require(opts[key] in allowed, method, f"{key} must be one of {', '.join(map(repr, allowed))}, got {opts[key]!r}")


def check_privacy(method: str, opts: dict, privacy: dict) -> None:
    """Under DP centroids (`privacy.centroid_noise_multiplier`) what a client releases must be the noisy
    centroids and sizes and nothing else the data chose: so a fixed n_local (an "auto" K, or the template
    parts it brings, would tell the server something of the data outside the accountant), sub-cluster
    assignment (the assignment's counts would be a second release) and the prototype router (the moments
    would be a third). Each is refused in one line rather than silently replaced."""
    if privacy.get("centroid_noise_multiplier") is None:
        return
    require(opts["n_local"] != AUTO, method, "under DP centroids n_local must be a number (e.g. 4): choosing it from a "
            "client's data is a release the accountant does not cover")
    require(opts["assign"] == SUB_CLUSTER, method, "under DP centroids set assign = \"sub-cluster\": each example's "
            "assignment would be a second release of the data the accountant does not cover")
    require(opts["global_router"] == PROTOTYPE, method, "under DP centroids set global_router = \"prototype\": the "
            "discriminant router's moments would be a release the accountant does not cover")
