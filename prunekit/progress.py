"""Progress on stderr, the same line for every stage, and the libraries kept quiet: `--quiet`
prints nothing but errors, and without it the user sees prunekit's stages, not the INFO lines,
warnings and progress bars of the libraries underneath."""

import logging
import os
import sys
import warnings

_QUIET_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "onnxruntime", "coremltools", "transformers",
                  "huggingface_hub", "root")


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[prunekit] {message}", file=sys.stderr, flush=True)


def quiet_libraries(quiet: bool) -> None:
    """Library INFO logging off (ONNX Runtime's quantizer logs ~1,000 lines per model); with
    ``quiet``, their warnings and progress bars too. Set before the libraries load where it can be."""
    logging.getLogger().setLevel(logging.WARNING)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch resets its own loggers when it loads, from TORCH_LOGS ("-onnx": errors only; its ONNX
    # exporter warns once per torchvision op it skips); once loaded, only set_logs changes them.
    if "torch" not in sys.modules:
        os.environ.setdefault("TORCH_LOGS", "-onnx")
    elif "TORCH_LOGS" not in os.environ:  # with it set, torch honoured it at import and refuses set_logs
        import torch._logging

        torch._logging.set_logs(onnx=logging.ERROR)
    if quiet:
        warnings.filterwarnings("ignore")
        # Read when the libraries load (the CLI's case) ...
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        # ... and for a caller that has loaded them already.
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
            transformers_logging.set_verbosity_error()
