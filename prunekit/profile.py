"""Hardware profiles: the facts a pruning plan and a latency estimate depend on.

Built-in profiles are TOML files in ``prunekit/profiles``; a user passes their own as a path.
Validation names the bad key and the allowed values, because a release pipeline should fail on a
typo in a profile rather than deploy with a silently ignored setting.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from prunekit.errors import UserInputError
from prunekit.pattern import Pattern
from prunekit.pruning.registry import METHODS
RATE_PRECISIONS = ("fp32", "fp16", "int8")  # the compute rates a device lists
# What each runtime runs well: float, INT8 weights, 4-bit weights (ONNX Runtime MatMulNBits, all of
# them or all but the output head and the MLP's down projection, which stay at 8 bits: int4-mixed; or exactly
# the 4-bit grid a GGUF's weights already lie on, the rest at 8 bits: int4-source; Core ML per-block
# INT4 and 4-bit palettization, both iOS 18); TensorRT: fp16 and INT8 (QDQ).
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32", "int8", "int4", "int4-mixed", "int4-source"),
                      "coreml": ("fp16", "int8", "int4", "palette4"),
                      "tensorrt": ("fp16", "int8")}
PRECISIONS = ("fp32", "fp16", "int8", "int4", "int4-mixed", "int4-source", "palette4")
OBJECTIVES = ("latency", "size")
BUDGET_KEYS = ("max_ppl_increase", "max_kl", "max_latency_ms", "max_size_mb")
RUNTIMES = {"onnxruntime": "onnx", "coreml": "mlpackage", "tensorrt": "onnx+engine"}
LATENCY_BASES = ("measured", "estimated")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    runtime: str
    artifact: str
    latency_basis: str
    deployment_target: str | None
    device_name: str
    sparse_tensor_cores: bool
    peak_tflops: dict[str, float]
    sparse_peak_tflops: dict[str, float] | None
    sparse_gemm_speedup: float
    memory_bandwidth_gbs: float
    memory_gb: float
    preferred_channel_multiple: int
    default_method: str
    default_pattern: str
    default_sparsity: float
    default_precision: str
    default_calib: str
    default_calib_samples: int
    default_calib_seqlen: int
    source: str
    budget: dict  # the profile's default budget: BUDGET_KEYS -> limit (absent: no limit)
    objective: str  # what the search minimises within the budget: decode latency or artifact size
    search_amounts: tuple  # amounts of the default method the search tries (0: no pruning)
    search_precisions: tuple

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def builtin_profile_names() -> list[str]:
    folder = resources.files("prunekit") / "profiles"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(target: str) -> Profile:
    """Load a built-in profile by name, or a user profile from a ``.toml`` path."""
    if Path(target).is_dir():
        raise UserInputError(f"--target {target} is a folder: pass a profile .toml file or one of "
                             f"{', '.join(builtin_profile_names())}")
    if target.endswith(".toml") or "/" in target or Path(target).suffix:
        path = Path(target)
        if not path.is_file():
            raise UserInputError(f"profile file {target} does not exist: pass a TOML file or one of "
                                 f"{', '.join(builtin_profile_names())}")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (UnicodeDecodeError, OSError) as exc:
            raise UserInputError(f"profile file {target} is not readable UTF-8 text ({type(exc).__name__}): "
                                 f"pass a TOML file") from None
    else:
        names = builtin_profile_names()
        if target not in names:
            raise UserInputError(f"unknown target '{target}': valid targets are {', '.join(names)} "
                                 f"(or a path to a profile .toml)")
        text = (resources.files("prunekit") / "profiles" / f"{target}.toml").read_text(encoding="utf-8")
        source = f"builtin:{target}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"profile {source} is not valid TOML: {exc}") from None
    return parse_profile(data, source)


class _Reader:
    """Reads one table of a profile, collecting the keys it used to reject the unknown ones."""

    def __init__(self, table: dict, where: str, source: str):
        if not isinstance(table, dict):
            raise UserInputError(f"profile {source}: [{where}] must be a table")
        self.table, self.where, self.source, self.used = table, where, source, set()

    def _fail(self, key: str, why: str):
        name = f"{self.where}.{key}" if self.where else key
        raise UserInputError(f"profile {self.source}: key '{name}' {why}")

    def get(self, key, kind, *, allowed=None, default=..., check=None, why=""):
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                self._fail(key, "is missing" + (f" (allowed: {', '.join(map(str, allowed))})" if allowed else ""))
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self._fail(key, f"must be a {kind.__name__}, got {value!r}")
        if allowed is not None and value not in allowed:
            self._fail(key, f"is {value!r}; allowed values: {', '.join(map(str, allowed))}")
        if check is not None and not check(value):
            self._fail(key, f"is {value!r}; {why}")
        return value

    def rates(self, key, default=...):
        table = self.get(key, dict, default=default)
        if table is None:
            return None
        sub = _Reader(table, f"{self.where}.{key}", self.source)
        out = {p: sub.get(p, float, check=lambda v: v > 0, why="must be > 0") for p in RATE_PRECISIONS}
        sub.done()
        return out

    def done(self):
        extra = sorted(set(self.table) - self.used)
        if extra:
            self._fail(extra[0], f"is not a known key; allowed keys: {', '.join(sorted(self.used))}")


def parse_profile(data: dict, source: str) -> Profile:
    top = _Reader(data, "", source)
    runtime = _Reader(top.get("runtime", dict), "runtime", source)
    device = _Reader(top.get("device", dict), "device", source)
    defaults = _Reader(top.get("defaults", dict), "defaults", source)
    budget = _Reader(top.get("budget", dict, default={}), "budget", source)
    search = _Reader(top.get("search", dict, default={}), "search", source)
    name = top.get("name", str)
    description = top.get("description", str, default="")
    top.done()

    runtime_name = runtime.get("name", str, allowed=tuple(RUNTIMES))
    artifact = runtime.get("artifact", str, allowed=(RUNTIMES[runtime_name],))
    basis = runtime.get("latency_basis", str, allowed=LATENCY_BASES)
    deployment_target = runtime.get("deployment_target", str, default=None)
    runtime.done()

    positive = dict(check=lambda v: v > 0, why="must be > 0")
    runs = RUNTIME_PRECISIONS[runtime_name]
    precision = defaults.get("precision", str, allowed=runs)
    sparsity = defaults.get("sparsity", float, check=lambda v: 0 <= v < 1, why="must be in [0, 1)")
    sparse = device.get("sparse_tensor_cores", bool)
    profile = Profile(
        name=name,
        description=description,
        runtime=runtime_name,
        artifact=artifact,
        latency_basis=basis,
        deployment_target=deployment_target,
        device_name=device.get("name", str),
        sparse_tensor_cores=sparse,
        peak_tflops=device.rates("peak_tflops"),
        sparse_peak_tflops=device.rates("sparse_peak_tflops", default=None),
        sparse_gemm_speedup=device.get("sparse_gemm_speedup", float, default=1.0, **positive),
        memory_bandwidth_gbs=device.get("memory_bandwidth_gbs", float, **positive),
        memory_gb=device.get("memory_gb", float, **positive),
        preferred_channel_multiple=device.get("preferred_channel_multiple", int, **positive),
        default_method=defaults.get("method", str, allowed=METHODS),
        default_pattern=defaults.get("pattern", str, check=_pattern_ok,
                                     why="allowed values: structured, unstructured, N:M (e.g. 2:4)"),
        default_sparsity=sparsity,
        default_precision=precision,
        default_calib=defaults.get("calib", str, default="self"),
        default_calib_samples=defaults.get("calib_samples", int, default=128, **positive),
        default_calib_seqlen=defaults.get("calib_seqlen", int, default=512, **positive),
        source=source,
        budget={key: value for key in BUDGET_KEYS
                if (value := budget.get(key, float, default=None, check=lambda v: v >= 0,
                                        why="must be >= 0")) is not None},
        objective=search.get("objective", str, allowed=OBJECTIVES, default="latency"),
        search_amounts=tuple(sorted(float(a) for a in search.get(
            "amounts", list, default=[sparsity], check=_amounts_ok,
            why="must be a list of distinct numbers in [0, 1)"))),
        search_precisions=tuple(search.get(
            "precisions", list, default=[precision],
            check=lambda v: bool(v) and len(set(v)) == len(v) and all(p in runs for p in v),
            why=f"must be a list of distinct precisions {runtime_name} runs: {', '.join(runs)}")),
    )
    device.done()
    defaults.done()
    budget.done()
    search.done()
    if sparse and profile.sparse_peak_tflops is None:
        raise UserInputError(f"profile {source}: key 'device.sparse_peak_tflops' is missing "
                             f"(required when device.sparse_tensor_cores = true)")
    return profile


def _amounts_ok(values: list) -> bool:
    return (bool(values) and len(set(values)) == len(values)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values))


def _pattern_ok(value: str) -> bool:
    try:
        return str(Pattern.parse(value)) == value  # canonical spelling only: "2:4", not "02:04"
    except UserInputError:
        return False
