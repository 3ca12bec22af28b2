"""Ctrl-C that is honoured at safe points, so an interrupted conversion cleans up.

A KeyboardInterrupt raised at an arbitrary bytecode can land inside a gc callback (JAX
registers one; the exception is then printed and dropped, and the work runs on) or in
the middle of orbax's save (its background threads then keep writing into a directory
being removed). While `deferred()` is active, or after `install()`, SIGINT only sets a
flag; `check()` raises KeyboardInterrupt at the next safe point: between tensors, after
the imports, after the save. A second Ctrl-C interrupts at once.

Imports nothing heavy: the CLIs install the handler before importing JAX.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_requested = threading.Event()


def _on_sigint(signum, frame):
    if _requested.is_set():  # asked twice: stop now
        raise KeyboardInterrupt
    _requested.set()


def install() -> bool:
    """Defer SIGINT to `check()` from now on (main thread only). Returns whether it did."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGINT, _on_sigint)
    return True


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed since the handler was installed."""
    if _requested.is_set():
        _requested.clear()
        raise KeyboardInterrupt


def reset() -> None:
    """Forget a Ctrl-C no safe point saw (the handler is being removed)."""
    _requested.clear()


@contextlib.contextmanager
def deferred():
    """SIGINT deferred to `check()` inside the block (and checked on leaving it); the
    previous handler is restored after. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    installed = previous is not _on_sigint and install()
    try:
        yield
        check()
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)
            reset()
