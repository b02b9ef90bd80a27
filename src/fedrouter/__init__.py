"""fedrouter: task-centric personalized federated fine-tuning of language models with LoRA adapters."""

__version__ = "0.1.0"
