"""Measured latency of ONNX decoders on this machine's ONNX Runtime, in a process of their own:

    python -m prunekit.exporters.latency a/model.onnx b/model.onnx --rounds 12

Every artifact's session is opened first, then the rounds go round-robin over them (prefill of a
random prompt, then greedy decode steps through the KV cache); the parent (with torch and its
thread pools) waits idle meanwhile. The first round only warms up. No torch is imported here.

Each figure is the fastest of the rounds (a round's decode figure is the median of its steps); the
median over rounds is kept beside it. On a shared host the speed drifts over tens of seconds, and a
slow spell only ever adds time: the fastest of 12 rounds is what the machine gives the artifact
undisturbed, and two measurements of it, minutes apart, disagree by more than 10% far less often
than medians of 4 rounds did (bench/latency_noise.py, docs/results.md: on the 2-core EPYC, 2% of
window pairs for INT8 against 20%, 20% for fp32 against 37%).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def timed_round(runner, prompt: np.ndarray, decode_tokens: int) -> tuple[float, list[float]]:
    """One round on one session: seconds of the prompt's prefill, then of each greedy decode step."""
    start = time.perf_counter()
    logits, past = runner.step(prompt, runner.empty_cache())
    prefill = time.perf_counter() - start
    steps = []
    token = np.array([[int(logits[0, -1].argmax())]])
    for _ in range(decode_tokens):
        start = time.perf_counter()
        logits, past = runner.step(token, past)
        steps.append(time.perf_counter() - start)
        token = np.array([[int(logits[0, -1].argmax())]])
    return prefill, steps


def round_robin(runners: list, rounds: int, prompt_tokens: int = 128, decode_tokens: int = 32,
                seed: int = 0, vocab: int | None = None) -> tuple[list[list[float]], list[list[float]]]:
    """Each runner in turn, round after round, on one random prompt; round 0 warms every session up
    and is not kept. Per runner, per kept round: the prefill's seconds, and the median decode step's.
    ``vocab`` (default: the first runner's ONNX output width) bounds the prompt's token ids."""
    vocab = vocab or runners[0].session.get_outputs()[0].shape[-1]
    prompt = np.random.default_rng(seed).integers(3, vocab, size=(1, prompt_tokens))
    prefill, decode = [[] for _ in runners], [[] for _ in runners]
    for round_index in range(rounds + 1):
        for i, runner in enumerate(runners):
            first, steps = timed_round(runner, prompt, decode_tokens)
            if round_index:
                prefill[i].append(first)
                decode[i].append(statistics.median(steps))
    return prefill, decode


# The keys of a measured row that say how it was measured (the report's latency settings).
SETTINGS = ("threads", "prompt_tokens", "decode_tokens", "rounds", "estimate")
ESTIMATE = "fastest round (each round: the median of its decode steps)"
ROUNDS = 12  # after the warm-up: 32-34 s for the main job's four candidates of the 135M on 2 cores


def measure_many(paths: list[Path], prompt_tokens: int = 128, decode_tokens: int = 32, rounds: int = ROUNDS,
                 threads: int | None = None, seed: int = 0) -> list[dict]:
    from prunekit.exporters.ort_session import OnnxDecoder
    from prunekit.threads import usable_cores

    threads = threads or usable_cores()
    runners, rss = [], []
    for path in paths:
        before = current_rss_gb()
        runners.append(OnnxDecoder(path, threads=threads))
        rss.append(current_rss_gb() - before)
    prefill, decode = round_robin(runners, rounds, prompt_tokens, decode_tokens, seed)
    out = []
    for i, path in enumerate(paths):
        decode_ms = 1000 * min(decode[i])
        out.append({"prefill_ms": 1000 * min(prefill[i]), "decode_ms": decode_ms,
                    "prefill_median_ms": 1000 * statistics.median(prefill[i]),
                    "decode_median_ms": 1000 * statistics.median(decode[i]),
                    "decode_spread": (max(decode[i]) - min(decode[i])) / min(decode[i]),
                    "tokens_per_s": 1000 / decode_ms, "prompt_tokens": prompt_tokens,
                    "decode_tokens": decode_tokens, "rounds": rounds, "estimate": ESTIMATE,
                    "threads": threads, "session_rss_gb": round(rss[i], 3)})
    peak = peak_rss_gb()
    for row in out:
        row["process_peak_rss_gb"] = peak
    return out


def current_rss_gb() -> float:
    return _status_kb("VmRSS:") / 1e6


def peak_rss_gb() -> float:
    """This process's high-water RSS. Not ru_maxrss: Linux carries that across exec from the parent."""
    kb = _status_kb("VmHWM:")
    return kb / 1e6 if kb else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _status_kb(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure_in_subprocess(paths: Path | list[Path], **options) -> dict | list[dict]:
    """``measure_many`` in a fresh interpreter; one path gives one dict, a list gives a list."""
    many = isinstance(paths, (list, tuple))
    args = [sys.executable, "-m", "prunekit.exporters.latency", *map(str, paths if many else [paths])]
    for key, value in options.items():
        key = "rounds" if key == "repeats" else key
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"latency measurement of {paths} failed: {proc.stderr.strip()[-500:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return rows if many else rows[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(measure_many(args.models, args.prompt_tokens, args.decode_tokens, args.rounds,
                                  args.threads)))


if __name__ == "__main__":
    main()
