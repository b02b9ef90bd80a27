"""Process setup, once per process that runs fedrouter: libraries quiet (one line per problem, no
deprecation noise, no progress bars where nobody watches), and torch's threads as the config says."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries(progress_bars: bool = True) -> None:
    """Warnings and library chatter off; fedrouter's own warnings as 'fedrouter: ...' lines on stderr;
    the Hugging Face progress bars off unless asked for."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    logging.basicConfig(level=logging.WARNING, format="fedrouter: %(message)s")
    if not progress_bars:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (None: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
