"""prunekit: make a large language model fit the hardware it will run on.

The Python API mirrors the command line::

    import prunekit
    loaded = prunekit.load_model()                       # embedded SmolLM2-135M-Instruct
    result = prunekit.prune(loaded, "wanda", 0.5, "2:4", calib="wikitext2")
    report = prunekit.deploy("cpu-onnx").report
"""

from prunekit.models import load_model
from prunekit.pipeline import deploy
from prunekit.plan import make_plan
from prunekit.profile import load_profile
from prunekit.pruning.run import prune

__all__ = ["deploy", "load_model", "load_profile", "make_plan", "prune"]
