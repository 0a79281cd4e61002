"""Safe outputs: build everything in a temporary folder beside --out, move it into place at the end.

An interrupted run leaves nothing half-written where the user looks, an existing folder is replaced
only with --force, and an --out that cannot be written (or that holds the current folder or the
input model) is refused before any work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from prunekit.errors import UserInputError


def check_output(out: Path, force: bool, keep: tuple[Path, ...] = ()) -> None:
    """Fail before any work if --out would be overwritten without --force, would replace the
    current folder or one of ``keep`` (the inputs), or cannot be written at all."""
    out = Path(out)
    if out.exists() and not force:
        raise UserInputError(f"output {out} already exists: pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} is a file, not a folder: choose another --out")
    resolved = out.resolve()
    for inside, what in [(Path.cwd().resolve(), "the current folder")] + [
            (Path(k).resolve(), f"the input {k}") for k in keep]:
        if inside == resolved or resolved in inside.parents:
            raise UserInputError(f"--out {out} would replace {what}: choose a new folder, e.g. --out pruned/")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """The nearest existing ancestor must be a folder this process can create a folder in."""
    ancestor = Path(os.path.abspath(out)).parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserInputError(f"--out {out} is under {ancestor}, which is a file: choose another --out")
    try:
        Path(tempfile.mkdtemp(prefix=".prunekit-probe-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise UserInputError(f"--out {out} cannot be written ({exc.strerror or exc} in {ancestor}): "
                             f"choose a writable folder") from None


def ordinary_modes(folder: Path) -> None:
    """Give every file and folder the modes the umask gives a new one: libraries that write through
    private temporary files (safetensors, ONNX external data) leave them 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def staged_output(out: Path, force: bool):
    """Yield a temporary folder; on success it becomes ``out`` (the old one removed only then).
    Missing parent folders are made, and removed again when the run fails."""
    out = Path(out)
    check_output(out, force)
    made = []
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        ordinary_modes(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in made:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{stage.name.rsplit('-', 1)[-1]}"
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
