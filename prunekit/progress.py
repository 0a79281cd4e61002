"""One line of progress on stderr, the same for every stage (silent with --quiet)."""

import sys


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[prunekit] {message}", file=sys.stderr, flush=True)
