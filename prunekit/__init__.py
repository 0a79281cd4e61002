"""prunekit: make a large language model fit the hardware it will run on.

The Python API mirrors the command line::

    import prunekit
    loaded = prunekit.load_model()                       # embedded SmolLM2-135M-Instruct
    result = prunekit.prune(loaded, "wanda", 0.5, "2:4", calib="my-text.txt")
    report = prunekit.deploy("cpu-onnx").report

Names are imported on first use: ``prunekit --help`` and the input checks must not wait for torch.
"""

from importlib import import_module

_API = {"deploy": "prunekit.pipeline", "load_model": "prunekit.models", "load_profile": "prunekit.profile",
        "make_plan": "prunekit.plan", "prune": "prunekit.pruning.run"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
