"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025).

A matrices carry what clients share and are averaged across clients (weighted by examples); B matrices
carry what is client-specific and never leave the client (client-private state). Upload: A only.
"""

from __future__ import annotations

from dataclasses import replace

from fedrouter.methods import fedit
from fedrouter.methods.common import PartialAdapterClient, lora_matrices

SHARED = "lora_A"
OPTIONS = fedit.OPTIONS
check_options = fedit.check_options


class Server(fedit.Server):
    FACTS = replace(fedit.Server.FACTS, adapters="A shared + 1 private B per client")

    def travelling(self, adapter):
        return lora_matrices(adapter, SHARED)

    def adapters(self):
        return {}  # a full adapter needs a client's private B


class Client(PartialAdapterClient):
    # B starts from the run's initialisation (zeros) and then stays the client's own.
    TRAVELS, REST_IS_PRIVATE = SHARED, True
