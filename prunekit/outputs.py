"""Safe outputs: build everything in a temporary folder beside --out, move it into place at the end.

An interrupted run leaves nothing half-written where the user looks, and an existing folder is
replaced only with --force.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from prunekit.errors import UserInputError


def check_output(out: Path, force: bool) -> None:
    """Fail before any work if --out would be overwritten without --force."""
    if out.exists() and not force:
        raise UserInputError(f"output {out} already exists: pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} is a file, not a folder: choose another --out")


@contextmanager
def staged_output(out: Path, force: bool):
    """Yield a temporary folder; on success it becomes ``out`` (the old one removed only then)."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{stage.name.rsplit('-', 1)[-1]}"
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
