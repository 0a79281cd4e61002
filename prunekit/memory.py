"""The memory a streamed prune needs, from the model's config alone, against a budget
(``--max-memory``, default: what the machine has): the calibration batch is the largest that fits,
and a budget that cannot hold even one block with a batch of one is refused before any work.

The terms are the resident parts of a streamed prune (prunekit.pruning.blocks): the process itself
(Python, torch, the tokenizer), the embedding while block 0's inputs are captured, one decoder
block, the calibration activations, one batch's intermediate tensors, and the statistics the
method keeps per block (float64 Grams for SparseGPT and FASP's refit). They are an estimate, not
a measurement: bench/memory.py measures the peak against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prunekit.errors import UserInputError

GB = 1e9
PROCESS_BYTES = 0.6e9  # Python, torch, transformers and a 150k-token tokenizer: 0.49 GB measured (docs/memory.md)
BATCHES = (8, 4, 2, 1)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GB', '7.5G', '800MiB', '3e9' -> bytes; a one-line error otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS:
        raise UserInputError(f"--max-memory '{text}' is not a size: use e.g. 8GB, 7.5G or 800MiB")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value <= 0:
        raise UserInputError(f"--max-memory '{text}' must be more than zero")
    return int(value)


def machine_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup/memory.max")) -> int:
    """Physical memory, or the cgroup's limit when lower (a container's real ceiling)."""
    total = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = cgroup.read_text().strip()
        if limit != "max":
            total = min(total or int(limit), int(limit))
    except (OSError, ValueError):
        pass
    return total or 16 * 2**30


@dataclass(frozen=True)
class PruneMemory:
    """Bytes of each resident part of a streamed prune at one calibration batch size."""

    process: float
    embedding: float
    block: float
    activations: float
    batch: float
    statistics: float

    @property
    def total(self) -> float:
        # The embedding is gone before the first block loads: the peak is the larger of the two phases.
        capture = self.process + self.embedding + self.activations
        blocks = self.process + self.block + self.activations + self.batch + self.statistics
        return max(capture, blocks)

    def as_dict(self) -> dict:
        return {k: round(v / GB, 3) for k, v in {**self.__dict__, "total": self.total}.items()}


def streamed_prune_memory(config, method: str, samples: int, seqlen: int, batch: int) -> PruneMemory:
    from prunekit.arch import attention_shape

    hidden, inner = config.hidden_size, config.intermediate_size
    heads, kv_heads, head_dim = attention_shape(config)
    block = 4 * (hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inner)
    tokens = batch * seqlen
    # One batch through a block: q/k/v/o and the MLP's gate, up and their product, attention scores.
    work = 4 * tokens * (3 * inner + 4 * hidden + heads * head_dim * 2) + 4 * batch * heads * seqlen * seqlen
    values = heads * head_dim
    held = samples * seqlen / 8  # FASP holds an eighth of the calibration out, as rows
    # FASP: float32 Grams of the consumers' inputs, the held-out rows, and the MLP refit's kept
    # block of the Gram (at most 70% of the channels kept: half the square) in float32 beside its
    # float64 system. SparseGPT: float64 Grams and H⁻¹.
    # ADMM: float32 Grams and held-out rows of all four input groups, then per group its normalized
    # Gram, eigenbasis and held-out Gram (float32; float64 while normalizing) and six copies of the
    # stacked rows (gate and up together are the widest: 2·inner x hidden).
    grams = {"fasp": 4 * (inner**2 + values**2) + 4 * held * (inner + values) + 12 * inner**2 / 2,
             "sparsegpt": 2 * max(inner, hidden) ** 2 * 8 * 2,
             "admm": 4 * (2 * hidden**2 + values**2 + inner**2) + 4 * held * (2 * hidden + values + inner)
             + 28 * inner**2 + 6 * 4 * 2 * inner * hidden}.get(method, 0.0)
    return PruneMemory(process=PROCESS_BYTES, embedding=4 * config.vocab_size * hidden, block=2 * block,
                       activations=4 * samples * seqlen * hidden, batch=work, statistics=grams)


def self_calibration_bytes(config, parameters: int, samples: int, seqlen: int, rows: int = 64) -> float:
    """The peak of a streamed deploy's self-calibration (prunekit.weights.whole_model): the
    process, the blocks in bfloat16, the head in float32, the KV cache of ``rows`` samples at a
    time in bfloat16, and one step's float32 logits with their softmax and running sum."""
    from prunekit.arch import attention_shape

    _, kv_heads, head_dim = attention_shape(config)
    rows = min(rows, samples)
    head = config.vocab_size * config.hidden_size
    blocks = parameters - (0 if getattr(config, "tie_word_embeddings", False) else head)  # untied: head apart
    cache = 2 * 2 * config.num_hidden_layers * kv_heads * head_dim * rows * seqlen
    return PROCESS_BYTES + 2 * blocks + 4 * head + cache + 3 * 4 * rows * config.vocab_size


def text_writing_bytes(config, parameters: int, samples: int, seqlen: int, budget: int, why: str,
                       instead: str) -> float:
    """``self_calibration_bytes`` of a streamed run whose model writes ``samples`` of its own text
    (all its calibration, or those mixed into a text), refused in one line past ``budget``:
    ``why`` leads the message, ``instead`` is the flag that avoids the step."""
    need = self_calibration_bytes(config, parameters, samples, seqlen)
    if need > budget:
        raise UserInputError(f"{why}; the model writing its own calibration text needs about {need / GB:.1f} GB "
                             f"(its blocks in bfloat16): pass {instead}, or raise --max-memory")
    return need


def calibration_batch(config, method: str, samples: int, seqlen: int, budget: int) -> tuple[int, PruneMemory]:
    """The largest calibration batch whose streamed prune fits ``budget`` bytes, and its estimate;
    a one-line error when not even a batch of one does."""
    for batch in BATCHES:
        need = streamed_prune_memory(config, method, samples, seqlen, min(batch, samples))
        if need.total <= budget:
            return min(batch, samples), need
    parts = ", ".join(f"{k} {v:g}" for k, v in need.as_dict().items() if k != "total")
    raise UserInputError(f"a streamed prune of this model needs about {need.total / GB:.1f} GB even with a "
                         f"calibration batch of 1 ({parts} GB), more than --max-memory {budget / GB:.1f} GB: "
                         f"raise --max-memory, or lower --calib-samples / --calib-seqlen")
