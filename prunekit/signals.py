"""SIGTERM and SIGHUP (what CI runners, `timeout` and a closed terminal send) unwind like Ctrl-C:
the signal becomes an exception, so every staged output folder and temporary folder is removed on
the way out, and the CLI prints one line and exits 128 + the signal number."""

from __future__ import annotations

import signal


class Terminated(BaseException):
    """Raised in the main thread by a termination signal; a BaseException like KeyboardInterrupt,
    so that no library's ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _raise(signum, frame):
    raise Terminated(signum)


def unwind_on_termination() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
