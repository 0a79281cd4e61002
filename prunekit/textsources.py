"""Text from a local file or a Hugging Face dataset by name (real loading code for online users)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from prunekit.errors import UserInputError

# name -> (dataset, config, split for calibration, split for evaluation, text column)
DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
}


BUILTIN_TEXTS = ("pydoc",)


def pydoc_text() -> str:
    """Python's own documentation topics (the pydoc_data package): prose that ships with every
    Python, so an offline run always has held-out text to evaluate on."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def check_source(source: str, purpose: str) -> None:
    """Refuse, before any model loads, a text source that cannot be read: a missing file, a
    folder, an empty or binary file, or a dataset without its library."""
    if source in BUILTIN_TEXTS or (purpose == "calibration" and source == "self"):
        return
    if source in DATASETS:
        if importlib.util.find_spec("datasets") is None:
            raise UserInputError(f"{purpose} source '{source}' needs the datasets library: run "
                                 f"`pip install 'prunekit[datasets]'`, or pass a local text file")
        return
    read_text(source, purpose)


def read_text(source: str, purpose: str) -> str:
    """``purpose`` is 'calibration' or 'evaluation': it picks the dataset split, so the two never
    share text."""
    if source == "pydoc":
        return pydoc_text()
    if source in DATASETS:
        return _dataset_text(source, purpose)
    path = Path(source).expanduser()
    flag = "--calib" if purpose == "calibration" else "--eval"
    choices = ", ".join((*DATASETS, *BUILTIN_TEXTS)) + (", self" if purpose == "calibration" else "")
    if path.is_dir():
        raise UserInputError(f"{flag} {source} is a folder: pass a text file, or one of {choices}")
    if not path.is_file():
        raise UserInputError(f"{purpose} file {source} does not exist: pass a text file, or one of {choices}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{purpose} file {source} is not UTF-8 text: pass a plain text file") from None
    except OSError as exc:
        raise UserInputError(f"{purpose} file {source} cannot be read ({exc.strerror or exc})") from None
    if "\x00" in text:
        raise UserInputError(f"{purpose} file {source} is binary, not text: pass a plain text file")
    if not text.strip():
        raise UserInputError(f"{purpose} file {source} is empty: pass a file with text in it")
    return text


def _dataset_text(name: str, purpose: str) -> str:
    try:
        import datasets
    except ImportError:
        raise UserInputError(f"dataset '{name}' needs the datasets library: run `pip install 'prunekit[datasets]'`, "
                             f"or pass a local text file") from None
    repo, config, calib_split, eval_split, column = DATASETS[name]
    split = calib_split if purpose == "calibration" else eval_split
    try:
        if name == "c4":  # one shard is plenty and avoids downloading hundreds of GB
            shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
            rows = datasets.load_dataset(repo, data_files={split: shard}, split=split)
            rows = rows.select(range(min(len(rows), 20000)))
        else:
            rows = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:
        raise UserInputError(f"could not load dataset '{name}' ({repo}, offline?): pass a local text "
                             f"file instead ({type(exc).__name__})") from None
    return "\n\n".join(rows[column])
