"""Measured latency of an ONNX decoder on this machine's ONNX Runtime, in its own process so that
peak RSS is the runtime's alone:

    python -m prunekit.exporters.latency model.onnx --prompt 128 --decode 32 --repeats 3
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


def measure(path: Path, prompt_tokens: int = 128, decode_tokens: int = 32, repeats: int = 3,
            threads: int | None = None, seed: int = 0) -> dict:
    from prunekit.exporters.onnx import OnnxDecoder
    from prunekit.threads import usable_cores

    threads = threads or usable_cores()
    runner = OnnxDecoder(path, threads=threads)
    vocab = runner.session.get_outputs()[0].shape[-1]
    prompt = np.random.default_rng(seed).integers(3, vocab, size=(1, prompt_tokens))
    prefill, decode = [], []
    for run in range(repeats + 1):  # the first run warms up and is not counted
        start = time.perf_counter()
        logits, past = runner.step(prompt, runner.empty_cache())
        prefill_s = time.perf_counter() - start
        steps = []
        token = np.array([[int(logits[0, -1].argmax())]])
        for _ in range(decode_tokens):
            start = time.perf_counter()
            logits, past = runner.step(token, past)
            steps.append(time.perf_counter() - start)
            token = np.array([[int(logits[0, -1].argmax())]])
        if run:
            prefill.append(prefill_s)
            decode.extend(steps)
    decode_ms = 1000 * statistics.median(decode)
    return {"prefill_ms": 1000 * statistics.median(prefill),
            "decode_ms": decode_ms, "decode_p90_ms": 1000 * float(np.percentile(decode, 90)),
            "tokens_per_s": 1000 / decode_ms, "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "repeats": repeats, "threads": threads,
            "peak_rss_gb": peak_rss_gb()}


def peak_rss_gb() -> float:
    """This process's high-water RSS. Not ru_maxrss: Linux carries that across exec from the parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def measure_in_subprocess(path: Path, **options) -> dict:
    args = [sys.executable, "-m", "prunekit.exporters.latency", str(path)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"latency measurement of {path} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.prompt_tokens, args.decode_tokens, args.repeats, args.threads)))


if __name__ == "__main__":
    main()
