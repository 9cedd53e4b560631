"""TrainConfig: every knob of `python -m train`, validated strictly.

Standard library only: the cluster side imports this module to check a job's `train:` mapping
before anything is launched, on machines that may not have torch installed.

    python -m train [--config FILE.yaml|.json] [key=value ...]

Values on the command line are read like YAML scalars (`true`, `12`, `1e-4`, `sgd`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

AUTO = "auto"


def _f(default: Any, help: str, choices: tuple = ()) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    model: str = _f("resnet50", "torchvision classification model name, or package.module:factory")
    num_classes: int = _f(1000, "classes of the classifier head")
    image_size: int = _f(224, "input height and width in pixels")
    data: str = _f("synthetic", "synthetic | synthetic-learnable | path to an ImageFolder root holding train/ "
                               "(and val/), or to its packed form (python -m train.pack)")
    decode: str = _f(AUTO, "real images: gpu (nvJPEG, crop and normalise on the GPU) | cpu (PIL in the workers) | "
                           "auto (gpu on a GPU)", ("gpu", "cpu", AUTO))
    jpeg_decoder: str = _f("torchvision", "decode=gpu: torchvision (nvJPEG, batched) | nvimgcodec "
                                          "(nvImageCodec, the GPU's hardware JPEG decoders first; packages "
                                          "nvidia-nvimgcodec-cu13 and nvidia-nvjpeg) | dali (NVIDIA DALI decodes, "
                                          "crops and normalises; package nvidia-dali-cuda130); see bench/README.md",
                           ("torchvision", "nvimgcodec", "dali"))
    synthetic_size: int = _f(1_281_167, "images in one epoch of synthetic data (ImageNet-1k's train split by default)")
    # how long
    steps: int = _f(100, "total optimizer steps; 0 = run `epochs` epochs")
    epochs: int = _f(1, "epochs to run when steps=0")
    batch_size: int = _f(64, "images per process per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    # optimization
    optimizer: str = _f("sgd", "sgd (with momentum) | adamw", ("sgd", "adamw"))
    lr: float = _f(0.1, "peak learning rate, reached after warmup_steps, then cosine decay to 0")
    lr_scaling: str = _f("linear", "resumed at another world size (the per-process batch is kept, so the global "
                                   "batch changes): linear (the LR scaled with the global batch, Goyal et al. "
                                   "2017) | none (the LR kept)", ("linear", "none"))
    momentum: float = _f(0.9, "SGD momentum (AdamW: beta1)")
    weight_decay: float = _f(1e-4, "weight decay")
    warmup_steps: int = _f(0, "linear LR warmup steps")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing, in [0, 1)")
    seed: int = _f(0, "seed for weights, data order, augmentation and synthetic data")
    # speed
    precision: str = _f(AUTO, "bf16 | fp32 | auto (bf16 autocast on GPU, fp32 on CPU)", ("bf16", "fp32", AUTO))
    channels_last: Any = _f(AUTO, "true | false | auto (on for GPU)")
    compile: Any = _f(AUTO, "true | false | auto (torch.compile on for GPU, off on CPU)")
    compile_mode: str = _f("default", "torch.compile mode",
                           ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    fast_stem: Any = _f(AUTO, "true | false | auto (on for GPU): a ResNet stem (7x7/2 conv, 3x3/2 max-pool) "
                           "computed faster, same function and parameters (train/model.py)")
    tune_kernels: bool = _f(False, "Inductor coordinate-descent tuning of the kernels it generates (longer compile)")
    bucket_cap_mb: int = _f(25, "DDP gradient bucket size in MiB")
    ddp_always: bool = _f(False, "wrap the model in DDP at world size 1 too (to measure DDP's own cost)")
    grad_compress: str = _f("none", "DDP communication hook: none | bf16 (gradients all-reduced as bf16, "
                                    "torch's bf16_compress_hook: half the bytes on the network)", ("none", "bf16"))
    input_process: Any = _f(AUTO, "true | false | auto (on where CUDA's MPS runs): decode=gpu in a process of "
                                   "its own beside each rank (train/input_process.py), whose work goes before the "
                                   "step's; faster only under MPS (nvidia-cuda-mps-control -d): README, Real data")
    workers: int = _f(4, "DataLoader worker processes per rank (real images only)")
    prefetch_factor: int = _f(2, "batches each DataLoader worker loads ahead")
    threads: int = _f(0, "torch CPU threads per rank; 0 = CPU cores / local ranks")
    # bookkeeping
    log_every: int = _f(10, "steps between metrics records and rank 0 progress lines")
    val_every: int = _f(0, "steps between validation passes; 0 = once at the end (if the data has a val split); -1 = never")
    ckpt_every: int = _f(0, "steps between checkpoints; 0 = only at the end")
    keep_ckpts: int = _f(3, "checkpoints kept in ckpt_dir (oldest deleted first)")
    ckpt_dir: str = _f("runs/train/checkpoints", "where rank 0 writes ckpt_<step>.pt and `latest`")
    resume: bool = _f(True, "resume from ckpt_dir's latest checkpoint when there is one")
    out_dir: str = _f("runs/train/metrics", "where each rank writes metrics-rank<R>.jsonl and heartbeat-rank<R>.json")
    init_timeout_s: int = _f(600, "timeout of process-group init and of every collective, in seconds")
    tensorboard: Any = _f(AUTO, "true | false | auto (when the tensorboard package is installed): event files "
                                "under out_dir/tb (rank 0's metrics; every rank's throughput)")
    wandb_project: str = _f("", "log rank 0's metrics to this Weights & Biases project (off when empty; "
                               "needs the wandb package)")
    # test knob: a slow input pipeline on one rank (cluster top and report show it as a straggler)
    debug_sleep_ms: int = _f(0, "extra milliseconds of data loading per step on debug_sleep_rank (a test knob)")
    debug_sleep_rank: int = _f(-1, "the rank that debug_sleep_ms slows; -1 = every rank")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Keys whose value is true, false or "auto".
_TRISTATE = {"channels_last", "compile", "fast_stem", "tensorboard", "input_process"}


class ConfigError(ValueError):
    """A bad key or value; `key` names it, str() is one line for a user."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def valid_keys() -> list[str]:
    return list(FIELDS)


def parse_scalar(text: str) -> Any:
    """Read a command-line value the way YAML reads a plain scalar (bool, int, float, else str)."""
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for kind in (int, float):
        try:
            return kind(s.replace("_", "")) if s else s
        except ValueError:
            pass
    return s


def _coerce(key: str, value: Any) -> Any:
    f = FIELDS[key]
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(f.type)
    if key in _TRISTATE:
        value = parse_scalar(value) if isinstance(value, str) else value
        if isinstance(value, bool) or value == AUTO:
            return value
        raise ConfigError(key, f"expected true, false or auto, got {value!r}")
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(key, f"expected a string, got {value!r}")
        value = str(value)
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    if isinstance(value, str):
        value = parse_scalar(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(key, f"expected {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")


def _check_ranges(c: TrainConfig) -> None:
    positive = ["num_classes", "image_size", "batch_size", "grad_accum", "epochs", "log_every",
                "keep_ckpts", "bucket_cap_mb", "init_timeout_s", "prefetch_factor", "synthetic_size"]
    for key in positive:
        if getattr(c, key) < 1:
            raise ConfigError(key, f"must be >= 1, got {getattr(c, key)}")
    for key in ["steps", "warmup_steps", "ckpt_every", "workers", "threads", "weight_decay", "momentum",
                "debug_sleep_ms"]:
        if getattr(c, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {getattr(c, key)}")
    if c.val_every < -1:
        raise ConfigError("val_every", f"must be >= -1, got {c.val_every}")
    if not c.lr > 0:
        raise ConfigError("lr", f"must be > 0, got {c.lr}")
    if not 0 <= c.label_smoothing < 1:
        raise ConfigError("label_smoothing", f"must be in [0, 1), got {c.label_smoothing}")
    if not c.model or c.model.count(":") > 1:
        raise ConfigError("model", f"expected a torchvision model name or package.module:factory, got {c.model!r}")
    _check_limits(c)


# Upper bounds: past them a value is a typo (steps=1e26), and some would overflow C code or
# allocate without end. Floats must be finite (lr=.inf, nan).
LIMITS = {"steps": 10**12, "epochs": 10**6, "batch_size": 2**20, "grad_accum": 2**20, "image_size": 16384,
          "num_classes": 10**8, "synthetic_size": 10**12, "warmup_steps": 10**12, "seed": 2**63 - 1,
          "bucket_cap_mb": 2**20, "workers": 1024, "prefetch_factor": 1024, "threads": 4096,
          "log_every": 10**12, "val_every": 10**12, "ckpt_every": 10**12, "keep_ckpts": 10**6,
          "init_timeout_s": 7 * 24 * 3600}


def _check_limits(c: TrainConfig) -> None:
    import math
    for key, high in LIMITS.items():
        if getattr(c, key) > high:
            raise ConfigError(key, f"must be at most {high}, got {getattr(c, key)}")
    for key in ("lr", "momentum", "weight_decay", "label_smoothing"):
        if not math.isfinite(getattr(c, key)):
            raise ConfigError(key, f"must be a finite number, got {getattr(c, key)}")
    for key in ("model", "data", "ckpt_dir", "out_dir"):
        if not getattr(c, key).isprintable():
            raise ConfigError(key, f"contains a control or invisible character: {getattr(c, key)!r}")


def validate(mapping: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a mapping of keys to typed or string values; raise ConfigError."""
    if not isinstance(mapping, Mapping):
        raise ConfigError("train", f"expected a mapping of keys to values, got {type(mapping).__name__}")
    values = {}
    for key, value in mapping.items():
        if key not in FIELDS:
            raise ConfigError(str(key), "unknown key")
        values[key] = _coerce(key, value)
    config = TrainConfig(**values)
    _check_ranges(config)
    return config


def load_file(path: str) -> dict:
    """Read a flat mapping of TrainConfig keys from a .json or .yaml file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("--config", f"{path}: line {e.lineno}: {e.msg}") from None
    else:
        try:
            import yaml  # lazily: only YAML config files need it
        except ImportError:
            raise ConfigError("--config", f"{path}: reading YAML needs pyyaml; use a .json file or key=value") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError("--config", f"{path}: {e}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path}: expected a mapping of keys to values")
    return data


def parse_args(argv: list[str]) -> TrainConfig:
    """`[--config FILE] [key=value ...]` -> TrainConfig; later values win."""
    values: dict[str, Any] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] or (args.pop(0) if args else "")
            if not path:
                raise ConfigError("--config", "needs a file name")
            values.update(load_file(path))
        elif "=" in arg and not arg.startswith("-"):
            key, _, value = arg.partition("=")
            values[key] = value
        else:
            raise ConfigError(arg, "expected key=value or --config FILE")
    return validate(values)


def usage() -> str:
    lines = ["usage: python -m train [--config FILE.yaml|.json] [key=value ...]", "", "keys:"]
    for name, f in FIELDS.items():
        lines.append(f"  {name}={f.default!s:<24} {f.metadata['help']}")
    return "\n".join(lines)


def main_parse(argv: list[str]) -> TrainConfig:
    """parse_args for the command line: help on -h, one line and exit 2 on a mistake."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        raise SystemExit(0)
    try:
        return parse_args(argv)
    except ConfigError as e:
        print(f"train: {e}. Valid keys: {', '.join(FIELDS)}", file=sys.stderr)
        raise SystemExit(2) from None
