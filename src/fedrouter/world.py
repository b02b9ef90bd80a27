"""A run's world, from its config: the federated data, the shared model, the method's two parts, and each
client's workbench. Every engine builds it the same way -- the in-process engine for all clients at once,
a Flower node for the client it holds, the Flower server for its part only -- so that every process of a
run agrees on the data split, the initial adapter and the options.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys

import numpy as np

from fedrouter import config
from fedrouter.config import Config
from fedrouter.core.data import ClientData, FederatedData, build_federated_data
from fedrouter.core.embed import BASE, embed_cached, resolve_embedder
from fedrouter.core.model import TINY, default_cache_dir, load_base, tiny_base_built
from fedrouter.core.workbench import ClientWorkbench, SharedModel
from fedrouter.errors import FedrouterError
from fedrouter.methods import load_method
from fedrouter.methods.base import ClientContext, ClientPart, MethodSetup
from fedrouter.methods.privacy import private_parts
from fedrouter.progress import phase
from fedrouter.threads import chosen_threads, set_threads, usable_cpus

log = logging.getLogger(__name__)


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

    def __init__(self, cfg: Config, progress: bool = True, data: FederatedData | None = None, warm_ahead: bool = False):
        """`warm_ahead`: while a tiny base builds, clients' `warm_cache` runs in a second process (a run alone
        on its machine: the build holds one core)."""
        self.cfg = cfg
        if data is None:
            phase(f"building the data ({cfg.data}, {cfg.n_clients} clients)", progress)
        self.data = data or build_data(cfg)  # bad data fails here, before the model is loaded
        with _warming(cfg, progress) if warm_ahead and data is None else contextlib.nullcontext():
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


class EmbedOnlyWorkbench:
    """What a client part may use without the base model: its examples, and their embeddings by an encoder
    (`embed(texts, spec)`, cached on disk). Training and generation are not here."""

    def __init__(self, data: ClientData, general: list[dict], embed):
        self.client_id, self.tasks, self.n_train = data.client_id, data.tasks, len(data.train)
        self._splits = {"train": data.train, "test": data.test, "general": general}
        self._embed = embed

    def examples(self, split: str) -> list[dict]:
        return self._splits[split]

    def embed(self, texts: list[str], embedder: str = BASE, *, adapter=None) -> np.ndarray:
        return self._embed(texts, embedder)


class EncoderEmbedding:
    """(texts, spec) -> embeddings by the encoder `spec` names, each encoder loaded once, cached where the run
    caches them; "base" is refused (its model is not loaded here)."""

    def __init__(self, cfg: Config):
        self._embedders, self._cache = {}, config.cache_dir(cfg) or default_cache_dir()

    def embedder(self, spec: str):
        if spec == BASE:
            raise FedrouterError("embedder 'base' needs the base model, which is not loaded here")
        if spec not in self._embedders:
            self._embedders[spec] = resolve_embedder(spec)
        return self._embedders[spec]

    def __call__(self, texts: list[str], spec: str) -> np.ndarray:
        return embed_cached(self.embedder(spec), texts, self._cache)


def warm_caches(cfg: Config) -> None:
    """Every client's `warm_cache`, on one thread: the base model's build holds another core, and a second
    thread here would slow both (a cold default run took 167 s against 141 s). An encoder's vectors can differ
    in their last bits with its threads (silhouettes in the 10th decimal), so a cache filled here may differ
    so from one a run fills on two; every later run reads the same cache."""
    set_threads(1, explicit=1)
    data, client = build_data(cfg), load_method(cfg.method)[1](method_setup(cfg))
    embed = EncoderEmbedding(cfg)
    for c in data.clients:
        client.warm_cache(ClientContext(c.client_id, EmbedOnlyWorkbench(c, data.general_test, embed)))


@contextlib.contextmanager
def _warming(cfg: Config, progress: bool):
    """Within the block, `warm_caches(cfg)` in a second process (yielded; None when not started) when the
    block builds the tiny base, the method has something to warm and the build's threads leave a CPU free.
    Waits for it at the end (it only fills caches: its failure costs time, and the run then computes the
    same itself); stops it by its pid when the block fails."""
    cpus = usable_cpus()
    if cfg.model != TINY or tiny_base_built(config.tiny_spec(cfg), config.cache_dir(cfg)) or \
            load_method(cfg.method)[1].warm_cache is ClientPart.warm_cache or (chosen_threads() or cpus) >= cpus:
        yield None
        return
    phase("embedding the clients' data in a second process while the base model builds", progress)
    child = subprocess.Popen([sys.executable, "-m", "fedrouter.world"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True)
    try:
        with contextlib.suppress(OSError):  # a child that died at once: the run computes it all itself
            child.stdin.write(cfg.model_dump_json())
            child.stdin.close()
        yield child
        if child.poll() is None:
            phase("waiting for the second process's embeddings", progress)
        log.debug("cache warming exited %s", child.wait())
    finally:
        if child.poll() is None:  # the block failed (or was interrupted): the child is no longer wanted
            child.kill()
            child.wait()


if __name__ == "__main__":  # the second process of `_warming`: the run's config on stdin
    warm_caches(Config.model_validate_json(sys.stdin.read()))
