"""FedRouter ("Task-Centric Personalized Federated Fine-Tuning of Language Models"), one package split by axis.

Setup (nothing label-derived leaves a client): each client embeds its training examples once (features.py),
splits them into sub-clusters and sends each one's size, mean and spread (local.py); the server clusters
them into global clusters, one per task and LoRA adapter (server_step.py); with assign "example" each client
then puts each example in the cluster of its nearest centre; with the discriminant router each client sends
its inputs' moments per cluster (router.py). Round t: a client trains its local cluster (t + offset) mod
n_local (schedule.py); the server averages per cluster (server.py). Evaluation, predict and serve route each
input by one function (router.py). fedrouter-star trains every local cluster every round; fedrouter-oracle
clusters and routes by the true tasks (an upper reference). Options: options.py; thresholds: thresholds.py.
"""

from fedrouter.methods.fedrouter.client import Client
from fedrouter.methods.fedrouter.options import LOOSE, OPTIONS, check_options, check_privacy
from fedrouter.methods.fedrouter.server import OracleServer, Server, StarServer

__all__ = ["Client", "Server", "StarServer", "OracleServer", "OPTIONS", "LOOSE", "check_options", "check_privacy"]
