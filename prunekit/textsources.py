"""Text from a local file or a Hugging Face dataset by name (real loading code for online users)."""

from __future__ import annotations

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


def read_text(source: str, purpose: str) -> str:
    """``purpose`` is 'calibration' or 'evaluation': it picks the dataset split, so the two never
    share text."""
    if source == "pydoc":
        return pydoc_text()
    if source in DATASETS:
        return _dataset_text(source, purpose)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserInputError(f"{purpose} file {source} does not exist: pass a text file, or one of "
                             f"{', '.join((*DATASETS, *BUILTIN_TEXTS))}" + (", self" if purpose == "calibration" else ""))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{purpose} file {source} is not UTF-8 text") from None


def _dataset_text(name: str, purpose: str) -> str:
    try:
        import datasets
    except ImportError:
        raise UserInputError(f"dataset '{name}' needs the datasets library: run `pip install datasets`, "
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
