"""What checkpoints cost on the default experiment: their size and the seconds they add to a round.

Builds the default run (FedRouter, dual, 8 clients; `--method` to change), does the setup exchange and
one round, then writes what that round's checkpoints would be, `--repeats` times each, and prints the
median write times and sizes beside the round's own time:

- in-process: the server's one checkpoint file, which holds every client's private state too;
- Flower: the server's checkpoint (no client state: it stays on the nodes), and on each node the file
  of its own client's state (`engines.node_store`), written in parallel by the nodes.

Usage: python bench/checkpoint_cost.py [--method fedrouter] [--repeats 5]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fedrouter import checkpoint
from fedrouter.config import load_config
from fedrouter.engines.driver import checkpoint_payload
from fedrouter.engines.flower.node_store import NodeStore
from fedrouter.engines.flower.server import FlowerClients, FlowerTransport
from fedrouter.engines.flower.wire import state_bytes
from fedrouter.engines.inprocess import InProcessClients
from fedrouter.engines.loop import RoundLoop
from fedrouter.world import World, client_part, server_part


def _median_write(write, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        write(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="fedrouter")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = load_config(None, {"method": args.method, "threads": 1})
    world = World(cfg, progress=False)
    contexts = world.contexts()
    server = server_part(cfg, world.shared, sorted(contexts))
    clients = InProcessClients(client_part(cfg), contexts, progress=False)
    ids = clients.ids
    loop = RoundLoop(server, clients.transport, ids, 1, progress=False)
    loop.setup()
    start = time.perf_counter()
    loop.run()
    round_s = time.perf_counter() - start

    def pct(seconds: float) -> str:
        return f"+{seconds / round_s * 100:.1f}% per round"

    with tempfile.TemporaryDirectory() as tmp:
        inprocess, flower = Path(tmp) / "inprocess", Path(tmp) / "flower"
        inprocess.mkdir(), flower.mkdir()
        payload = checkpoint_payload(cfg, server, clients, loop, {}, {}, {})
        write_s = _median_write(lambda i: checkpoint.save(inprocess, i + 1, payload, keep=2), args.repeats)
        size = checkpoint.path_of(inprocess, args.repeats).stat().st_size
        print(f"{args.method}, default experiment ({len(ids)} clients), one round {round_s:.1f} s")
        print(f"  in-process: checkpoint {size / 1e6:.2f} MB, write {write_s * 1000:.0f} ms (median of {args.repeats}), {pct(write_s)}")

        # the Flower engine's client side as a server checkpoint sees it (no grid needed to read its state)
        flower_side = FlowerClients(FlowerTransport(None, {cid: cid for cid in ids}, "", None), clients.info(), cfg.checkpoint_keep)
        flower_payload = checkpoint_payload(cfg, server, flower_side, loop, {}, {}, {})
        server_s = _median_write(lambda i: checkpoint.save(flower, i + 1, flower_payload, keep=2), args.repeats)
        server_size = checkpoint.path_of(flower, args.repeats).stat().st_size
        node_s, node_sizes = [], []
        for cid, ctx in sorted(contexts.items()):
            store = NodeStore.of(flower, "0123456789ab", cid)
            # what a node serialises and writes after a message that changed its client's state
            blob_of = lambda: state_bytes({"state": ctx.state, "streams": ctx.workbench.stream_state()})  # noqa: E731
            node_s.append(_median_write(lambda i: store.write(i + 1, blob_of(), keep_from=i + 1, keep=set()), args.repeats))
            node_sizes.append(len(blob_of()))
        slowest = max(node_s)
        print(f"  flower: server checkpoint {server_size / 1e6:.2f} MB, write {server_s * 1000:.0f} ms; per node: "
              f"client state {statistics.median(node_sizes) / 1e6:.2f} MB (largest {max(node_sizes) / 1e6:.2f}), "
              f"serialise + write {statistics.median(node_s) * 1000:.0f} ms (slowest node {slowest * 1000:.0f} ms); "
              f"nodes write in parallel: {pct(server_s + slowest)}")


if __name__ == "__main__":
    main()
