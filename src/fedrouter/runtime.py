"""Process setup, once per process that runs fedrouter: libraries quiet (one line per problem, no
deprecation noise, no progress bars where nobody watches), and SIGTERM / SIGINT turned into an exception
that a run can record before it exits. (Threads: `fedrouter.threads`.)"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import warnings

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The process got SIGTERM or SIGINT (a kill, a timeout, a batch scheduler, Ctrl-C). A BaseException,
    like KeyboardInterrupt, so that nothing meant for errors swallows it; a run marks itself FAILED with it,
    and the command line exits with 128 + the signal's number."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM and SIGINT raise `Interrupted` in the main thread, where Python runs
    signal handlers; each does so once -- a second signal of the same kind acts as the default (stops at
    once). Outside the main thread (where no handler can be set) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def quiet_libraries(progress_bars: bool = True) -> None:
    """Warnings and library chatter off; fedrouter's own warnings as 'fedrouter: ...' lines on stderr;
    the Hugging Face progress bars off unless asked for."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    logging.basicConfig(level=logging.WARNING, format="fedrouter: %(message)s")
    if not progress_bars:
        from transformers.utils import logging as hf_logging  # start-up cost: transformers (0.5 s after torch)

        hf_logging.disable_progress_bar()
