"""ONNX Runtime's logits of one artifact, in a process of its own, written to disk:

    python -m prunekit.exporters.onnx_judge model.onnx --windows w.npy --out logits/ [--probe p.npy]

A streamed deploy judges artifacts of models that may not fit in memory twice: ONNX Runtime's
session of a float artifact holds all its weights (7.5 GB for a 1.5B model), so it runs here, after
the deploy process has let go of every block, and leaves only files behind: one ``.npy`` of
next-token logits per window, named by ``window_key`` as prunekit.evaluation.StoredLogits names its
own, and, with ``--probe``, the probe's prefill logits and its last tokens fed one at a time
through the KV cache (what prunekit.exporters.onnx_streamed.check_streamed_logits compares).
No torch is imported here, so the process holds the session and little else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

CACHED_TOKENS = 4  # probe tokens fed one at a time through the cache after the prefill of the rest


def window_key(window) -> str:
    """The file stem of a window's logits: a hash of its int64 token ids."""
    return hashlib.sha256(np.asarray(window, dtype=np.int64).tobytes()).hexdigest()[:32]


def probe_outputs(runner, ids: np.ndarray, cached: int = CACHED_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits of ``ids`` (1, seq), the last ``cached`` tokens' logits when fed one at a
    time after a prefill of the others): the verification's two readings of the artifact."""
    logits, _ = runner.step(ids, runner.empty_cache())
    _, past = runner.step(ids[:, :-cached], runner.empty_cache())
    steps = []
    for i in range(ids.shape[1] - cached, ids.shape[1]):
        step, past = runner.step(ids[:, i:i + 1], past)
        steps.append(step[0, -1])
    return logits[0], np.stack(steps)


def write_logits(path: Path, windows: np.ndarray, out: Path, probe: np.ndarray | None = None) -> dict:
    """Each window's next-token logits (seq - 1 rows) to ``out``; the probe's outputs beside them."""
    from prunekit.exporters.ort_session import OnnxDecoder

    runner = OnnxDecoder(path)
    out.mkdir(parents=True, exist_ok=True)
    for window in windows:
        logits, _ = runner.step(window[None], runner.empty_cache())
        np.save(out / f"{window_key(window)}.npy", logits[0, :-1].astype(np.float32))
    if probe is not None:
        prefill, steps = probe_outputs(runner, probe[None])
        np.save(out / "probe-prefill.npy", prefill)
        np.save(out / "probe-steps.npy", steps)
    return {"windows": int(len(windows)), "kv_cache_io": runner.has_kv_cache, "peak_rss_gb": _peak_rss_gb()}


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def judge_in_subprocess(path: Path, windows: np.ndarray, out: Path, probe: np.ndarray | None = None) -> dict:
    """``write_logits`` in a fresh interpreter: its session's memory is gone when this returns."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "windows.npy", np.asarray(windows, dtype=np.int64))
    args = [sys.executable, "-m", "prunekit.exporters.onnx_judge", str(path), "--windows", str(out / "windows.npy"),
            "--out", str(out)]
    if probe is not None:
        np.save(out / "probe.npy", np.asarray(probe, dtype=np.int64))
        args += ["--probe", str(out / "probe.npy")]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"judging {path} in ONNX Runtime failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--probe", type=Path, default=None)
    args = parser.parse_args()
    probe = None if args.probe is None else np.load(args.probe)
    print(json.dumps(write_logits(args.model, np.load(args.windows), args.out, probe)))


if __name__ == "__main__":
    main()
