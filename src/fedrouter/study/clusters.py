"""`fedrouter clusters`: FedRouter's task discovery and router on a data set, without training.

It runs the method's own setup -- the same server and client parts, options and privacy settings as
`fedrouter run`, through the round loop's setup exchange -- with clients whose workbench can only embed
(`EmbedOnlyWorkbench`), then routes every client's test inputs and the all-task set as the method's
evaluation does, and scores both with the method's one scorer: the keys of results.json's `clustering`.
Prints a summary and writes the report as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fedrouter.atomic import write_text
from fedrouter.core.embed import BASE
from fedrouter.engines.inprocess import InProcessTransport
from fedrouter.engines.loop import RoundLoop
from fedrouter.errors import FedrouterError
from fedrouter.methods import load_method
from fedrouter.methods.base import ClientContext
from fedrouter.methods.fedrouter import Server
from fedrouter.methods.fedrouter.scoring import confusion
from fedrouter.study.tables import score_text
from fedrouter.world import EmbedOnlyWorkbench, EncoderEmbedding, build_data, build_shared, method_setup


def embedding_function(cfg, spec: str):
    """((texts, spec) -> embeddings, the embedder's name) as FedRouter's clients embed (the base model only for
    "base")."""
    if spec == BASE:
        shared = build_shared(cfg, progress=False)
        return (lambda texts, _spec: shared.embed(texts, spec)), shared.embedder(spec).name
    embed = EncoderEmbedding(cfg)
    return embed, embed.embedder(spec).name


def cluster_data(cfg) -> dict:
    """The method's setup and routing on the config's data split, scored: a JSON-able report."""
    server_class, client_class = load_method(cfg.method)
    if not issubclass(server_class, Server):
        raise FedrouterError(f"fedrouter clusters runs FedRouter's task discovery; method {cfg.method} has none")
    start = time.perf_counter()
    data = build_data(cfg)
    setup = method_setup(cfg)
    embed, embedder_name = embedding_function(cfg, setup.options["embedder"])
    server, client = server_class(setup, {}, [c.client_id for c in data.clients]), client_class(setup)
    contexts = {c.client_id: ClientContext(c.client_id, EmbedOnlyWorkbench(c, data.general_test, embed)) for c in data.clients}
    RoundLoop(server, InProcessTransport(client, contexts, progress=False), sorted(contexts), cfg.rounds, seed=cfg.seed,
              progress=False).setup()
    messages = server.configure_evaluate(sorted(contexts))
    routes = {split: {cid: {"route_counts": confusion([e["task"] for e in ctx.workbench.examples(split)],
                                                      client.route(messages[cid], ctx, split))}
                      for cid, ctx in contexts.items()} for split in ("test", "general")}
    truth = {cid: {"tasks": [e.get("task") for e in ctx.workbench.examples("train")],
                   "clusters": client.clusters_of_examples(messages[cid], ctx).tolist()} for cid, ctx in contexts.items()}
    report = server.report(routes, truth)["clustering"]
    return {"data": cfg.data, "scenario": cfg.scenario, "n_clients": cfg.n_clients, "seed": cfg.seed, "method": cfg.method,
            "method_options": setup.options, "embedder_name": embedder_name, "tasks": data.tasks,
            "client_tasks": {str(c.client_id): c.tasks for c in data.clients}, **report, "wall_s": time.perf_counter() - start}


def _curve_line(curve: dict | None) -> str:
    """'1:0.081* 2:0.212 ...': silhouette by K (K=1: the bar a split must clear), * on the chosen K."""
    if not curve:
        return "-"
    best = max(curve.values())
    chosen = min(int(k) for k, v in curve.items() if v == best)
    return " ".join(f"{k}:{v:.3f}{'*' if int(k) == chosen else ''}" for k, v in curve.items())


def format_summary(report: dict) -> str:
    router = report["router_accuracy"]
    lines = [
        f"clusters | {report['data']} | scenario {report['scenario']} | {report['n_clients']} clients | "
        f"embedder {report['embedder_name']} | {report['wall_s']:.0f} s",
        f"global: {report['n_global']} clusters from {report['n_prototypes']} prototypes | clustering accuracy "
        f"{score_text(report['accuracy'])}, ARI {score_text(report['ari'])}, purity {score_text(report['purity'])} | "
        f"local accuracy {score_text(report['local_accuracy'])}",
        f"router accuracy ({report['router_mode']['global_router']}): own tests {score_text(router['own_test'])}, "
        f"all tasks {score_text(router['generalization'])}",
    ]
    if report.get("assignment"):
        done = report["assignment"]
        lines.append(f"each example to its nearest cluster centre: {done['clusters_before']} clusters -> {report['n_global']} "
                     f"(emptied: {done['emptied'] or 'none'}; joined by co-occurrence: {done['joined'] or 'none'})")
    if report["silhouette"]["global"]:
        lines.append("silhouette of the clients' examples by K (server): " + _curve_line(report["silhouette"]["global"]))
    per_client = report.get("per_client") or {}
    lines.append(f"{'client':>6}  {'tasks':<30} {'sub':>4} {'n_local':>7} {'accuracy':>8}  silhouette by K (1 = the bar; * chosen)")
    for cid, tasks in report["client_tasks"].items():
        scores = per_client.get(cid, {})
        lines.append(f"{cid:>6}  {'+'.join(map(str, tasks))[:30]:<30} {report['n_sub'].get(cid, 0):>4} {report['n_local'].get(cid, 0):>7} "
                     f"{score_text(scores.get('accuracy')):>8}  {_curve_line(report['silhouette']['local'].get(cid))}")
    if report.get("confusion"):
        clusters = sorted({int(k) for counts in report["confusion"].values() for k in counts})
        lines.append("confusion (training examples of each true task per global cluster):")
        lines.append(f"{'task':<28} " + " ".join(f"{'c' + str(k):>6}" for k in clusters))
        for task, counts in report["confusion"].items():
            lines.append(f"{task[:28]:<28} " + " ".join(f"{counts.get(str(k), 0):>6}" for k in clusters))
    return "\n".join(lines)


def _strict(value):
    """NaN/inf -> None, numpy scalars -> Python, so the report is strict JSON."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_report(path: Path, report: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(_strict(report), indent=2, allow_nan=False))
    except OSError as exc:
        raise FedrouterError(f"cannot write {path}: {exc.strerror or exc}") from None
