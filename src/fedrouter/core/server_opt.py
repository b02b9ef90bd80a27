"""Server optimizers for averaging methods (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The clients' weighted average x_avg gives a pseudo-gradient delta = x_avg - x; the server then steps:
  fedavg : x <- x_avg                                   (plain FedAvg: the step is delta, lr 1)
  fedavgm: m <- beta1 * m + delta;       x <- x + lr * m
  fedadam: m <- beta1 * m + (1 - beta1) * delta;  v <- beta2 * v + (1 - beta2) * delta^2
           x <- x + lr * m / (sqrt(v) + tau)
  fedyogi: as fedadam, but v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)
m starts at 0 and v at tau^2 (Reddi et al., Algorithm 2); no bias correction, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
# lr 1 with momentum 0.9 for FedAvgM; the adaptive ones move every coordinate by about lr per round,
# so their lr is of the order of one round's client update of a LoRA weight (Reddi et al. tune it per task).
DEFAULT_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2}


@dataclass
class ServerOptimizer:
    kind: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"server optimizer must be one of {', '.join(KINDS)}, got {self.kind!r}")
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict:
        """The moments (plain data, for a checkpoint); the settings come from the config."""
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v = dict(state["m"]), dict(state["v"])

    def step(self, current: dict[str, torch.Tensor], average: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new server state from the current one and this round's client average."""
        if self.kind == "fedavg":
            return {k: v.clone() for k, v in average.items()}
        out = {}
        for key, x in current.items():
            x64 = x.to(torch.float64)
            delta = average[key].to(torch.float64) - x64
            m = self.m.get(key, torch.zeros_like(delta))
            if self.kind == "fedavgm":
                self.m[key] = self.beta1 * m + delta
                out[key] = (x64 + self.lr * self.m[key]).to(x.dtype)
                continue
            self.m[key] = self.beta1 * m + (1 - self.beta1) * delta
            v = self.v.get(key, torch.full_like(delta, self.tau**2))
            square = delta**2
            if self.kind == "fedadam":
                self.v[key] = self.beta2 * v + (1 - self.beta2) * square
            else:
                self.v[key] = v - (1 - self.beta2) * square * torch.sign(v - square)
            out[key] = (x64 + self.lr * self.m[key] / (self.v[key].sqrt() + self.tau)).to(x.dtype)
        return out
