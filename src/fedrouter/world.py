"""A run's world, from its config: the federated data, the shared model, the method's two parts, and each
client's workbench. Every engine builds it the same way -- the in-process engine for all clients at once,
a Flower node for the client it holds, the Flower server for its part only -- so that every process of a
run agrees on the data split, the initial adapter and the options.
"""

from __future__ import annotations

from fedrouter import config
from fedrouter.config import Config
from fedrouter.core.data import FederatedData, build_federated_data
from fedrouter.core.model import default_cache_dir, load_base
from fedrouter.core.workbench import ClientWorkbench, SharedModel
from fedrouter.methods import load_method
from fedrouter.methods.base import ClientContext, MethodSetup
from fedrouter.methods.privacy import private_parts
from fedrouter.progress import phase


def build_data(cfg: Config) -> FederatedData:
    """The federated split of the config's data (deterministic: every process that builds it agrees)."""
    return build_federated_data(
        cfg.data, cfg.scenario, cfg.n_clients, cfg.train_per_client, cfg.test_per_client,
        cfg.general_test_per_task, seed=cfg.seed, task_field=cfg.task_field, tasks=cfg.tasks,
        dirichlet_alpha=cfg.dirichlet_alpha, sources=cfg.data_sources, fields=cfg.data_fields,
    )


def build_shared(cfg: Config, progress: bool = True) -> SharedModel:
    """The base model with its LoRA slot and the training settings (the same initial adapter everywhere)."""
    phase(f"loading the base model ({cfg.model})", progress)
    base, tokenizer = load_base(cfg.model, config.cache_dir(cfg), config.tiny_spec(cfg), progress, config.hardware(cfg))
    return SharedModel(base, tokenizer, config.lora_settings(cfg), config.train_settings(cfg), seed=cfg.seed,
                       cache_dir=config.cache_dir(cfg) or default_cache_dir())


def method_setup(cfg: Config) -> MethodSetup:
    privacy = cfg.privacy.model_dump() if cfg.privacy.mode != "off" else {}
    ranks = tuple(cfg.lora.client_ranks) if cfg.lora.client_ranks else None
    return MethodSetup(cfg.seed, cfg.rounds, config.method_options(cfg), privacy, ranks)


def server_part(cfg: Config, shared: SharedModel, client_ids: list[int]):
    """The method's server part; under central DP inside the DP-FedAvg wrapper (`methods.privacy`)."""
    server_cls, _ = load_method(cfg.method)
    server, _ = private_parts(server_cls(method_setup(cfg), shared.initial_adapter, sorted(client_ids)), None,
                             cfg.privacy, cfg.seed)
    return server


def client_part(cfg: Config):
    """The method's client part; under local DP inside the wrapper that clips and noises its uploads."""
    _, client_cls = load_method(cfg.method)
    _, client = private_parts(None, client_cls(method_setup(cfg)), cfg.privacy, cfg.seed)
    return client


class World:
    """Data and shared model of a run, and client workbenches made from them on demand (each client's
    data encoded once; the all-task test set encoded once for all)."""

    def __init__(self, cfg: Config, progress: bool = True, data: FederatedData | None = None):
        self.cfg = cfg
        if data is None:
            phase(f"building the data ({cfg.data}, {cfg.n_clients} clients)", progress)
        self.data = data or build_data(cfg)  # bad data fails here, before the model is loaded
        self.shared = build_shared(cfg, progress)
        self._general = self.shared.encode(self.data.general_test)
        self._clients = {c.client_id: c for c in self.data.clients}

    def workbench(self, client_id: int, train_seed: int | None = None) -> ClientWorkbench:
        """`client_id`'s workbench; `train_seed` (default: the run's seed) seeds its batch order and dropout,
        not its data: benchmarks use it to tell batch-order luck from a method's effect."""
        seed = self.cfg.seed if train_seed is None else train_seed
        return ClientWorkbench(self.shared, self._clients[client_id], self.data.general_test, seed, self._general)

    def contexts(self) -> dict[int, ClientContext]:
        """Every client's context (its workbench, an empty private state)."""
        return {cid: ClientContext(cid, self.workbench(cid)) for cid in sorted(self._clients)}
