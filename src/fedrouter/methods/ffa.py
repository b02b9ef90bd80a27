"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

A is frozen at an initialisation every client shares (the run's seeded LoRA init, which each client
derives itself); only B is trained, uploaded and averaged. With A common and fixed, the average of the
clients' B·A equals (average B)·A exactly, so averaging loses nothing.
"""

from __future__ import annotations

from dataclasses import replace

from fedrouter.methods import fedit
from fedrouter.methods.common import PartialAdapterClient, lora_matrices

TRAINED = "lora_B"
OPTIONS = fedit.OPTIONS
check_options = fedit.check_options


class Server(fedit.Server):
    FACTS = replace(fedit.Server.FACTS, adapters="1 global adapter (A frozen)")

    def travelling(self, adapter):
        return lora_matrices(adapter, TRAINED)


class Client(PartialAdapterClient):
    # A stays the run's shared seeded initialisation, frozen; only B trains and travels.
    TRAVELS, REST_IS_PRIVATE = TRAINED, False
