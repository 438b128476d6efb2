"""SIGTERM (kill, a batch system's time limit, torchrun stopping the other processes when one fails) for the
command-line programs: unwound as Ctrl-C is, so that temporary files are removed and logs end as aborted, or,
where unwinding is not safe (around loader worker processes), the process dies by it at once after removing
the temporary files of the outputs being written (`outputs.partial_output`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from dlrmkit import outputs


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where KeyboardInterrupt would be for Ctrl-C; exit status 128 + 15."""


def _terminate(signum, frame):
    raise Terminated()


def _die_by_signal(signum, frame):
    outputs.remove_partial_outputs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def sigterm_unwinds(unwind: bool = True):
    """While the body runs (in the main thread): SIGTERM raises Terminated when `unwind`; else the process dies
    by it at once, as without a handler, after removing the temporary files of the outputs being written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate if unwind else _die_by_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's status for the signal behind `interrupt`: 143 for SIGTERM, 130 for Ctrl-C (SIGINT)."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def interrupt_quietly_while_loading(program: str) -> None:
    """Ctrl-C before a program's libraries have loaded and its command line is read (a second or two) ends it with
    the line it prints later, `<program>: interrupted`, and status 130, not a traceback; `restore_interrupt` gives
    Ctrl-C back to Python (KeyboardInterrupt) where the program handles it."""
    def interrupted_while_loading(signum, frame):
        print(f"{program}: interrupted", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGINT)

    signal.signal(signal.SIGINT, interrupted_while_loading)


def restore_interrupt() -> None:
    """Ctrl-C raises KeyboardInterrupt again, if `interrupt_quietly_while_loading` took it (else left as it is)."""
    if getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "interrupted_while_loading":
        signal.signal(signal.SIGINT, signal.default_int_handler)
