"""What a method declares about itself for the layers above (`MethodFacts`). A module of its own, with no
torch behind it, so that the command line can read the registry without paying for torch's import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class MethodFacts:
    """What the layers above need to know of a method, declared by the method itself -- as `FACTS` on its
    server part class -- so that nothing outside `methods/` keeps a list of method names. Read by the config
    (what it refuses), the plan (what a run keeps), differential privacy (what it may wrap), and the report
    and tables (what they show)."""

    # What the run keeps at the end, for `--dry-run`: a text formatted with the method's options and
    # `n_clients` ("up to {n_clusters} cluster adapters"), or a function of (options, n_clients).
    adapters: str | Callable[[dict, int], str]
    # Every upload is folded by a plain mean (`ServerPart.average`) and nothing else is made of it, so
    # client-level DP covers the method: DP-FedAvg's wrapper may replace that mean (`methods.privacy`).
    folds_by_mean: bool = False
    # Why DP cannot cover the method (an exact release, or a fold the accountant does not count), the line the
    # config refuses DP with; None: `folds_by_mean` decides.
    private_refusal: str | None = None
    # It releases summaries of its clients' data at setup (FedRouter's centroids): under DP they go through
    # the Gaussian mechanism (privacy.centroid_noise_multiplier, required), accounted once, and delta must be
    # below 1 / train_per_client (the release protects each example).
    releases_data_summaries: bool = False
    # It adds a dense update to the base weights (a merged update, a partner adapter): a quantized base
    # cannot hold one.
    writes_base_weights: bool = False
    # results.json has a `clustering` section (the run's clusters against the true tasks): the terminal
    # summary prints it and the report draws the embedding map and silhouette curves from such a run.
    clustering_report: bool = False
    # It trains each client at its own rank (lora.client_ranks, read through `common.client_rank`); the config
    # refuses per-client ranks for a method without this.
    takes_client_ranks: bool = False

    def adapters_kept(self, options: dict, n_clients: int) -> str:
        if callable(self.adapters):
            return self.adapters(options, n_clients)
        return self.adapters.format(**options, n_clients=n_clients)
