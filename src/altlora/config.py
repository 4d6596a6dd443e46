"""Run configuration: one flat dataclass filled from built-in defaults, a YAML file and CLI flags.

Precedence: defaults < ``--config file.yaml`` < command-line flags. Every field is also a flag
(``lora_alpha`` -> ``--lora_alpha``); booleans take ``--flag``, ``--flag false`` or ``--no-flag``; lists are
comma-separated; ``optim_args`` is ``key=value,key=value``. ``--method`` and ``--optim_notes``
(the research code's flag) are aliases of ``--optimizer``, whose value is any name of the
method registry (:mod:`altlora.methods`, aliases included). Unknown keys and methods are
errors that name them and suggest the closest valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .validate import closest

__all__ = ["Config", "ConfigError", "add_config_flags", "resolve_config", "load_yaml", "read_yaml_mapping",
           "yaml_value", "save_config"]


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that also reads ``1e-3`` and ``3E-4`` as numbers (YAML 1.1 wants a dot
    and a signed exponent, ``1.0e-3``, and would return the string ``'1e-3'``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def yaml_value(text: str) -> Any:
    """One YAML scalar or collection from a string, numbers written as people write them."""
    return yaml.load(text, Loader=_Loader)


def read_yaml_mapping(path: str | Path, what: str, of: str) -> dict[str, Any]:
    """The mapping in YAML file ``path``; ConfigError naming the file if it is missing (``what``
    names the option that gave it), not YAML, or not a mapping (of ``of``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        data = yaml.load(p.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of {of}, got {type(data).__name__}")
    return data


def _f(default: Any, section: str, help: str) -> Any:
    kw = {"default_factory": (lambda d=default: type(d)(d))} if isinstance(default, (list, dict)) else {"default": default}
    return field(metadata={"section": section, "help": help}, **kw)


@dataclass
class Config:
    # model
    model: str = _f("smollm2-135m", "model", "built-in model name (see `altlora list models`) or a local HF model folder")
    gradient_checkpointing: bool = _f(False, "model", "trade compute for memory")
    quantize: str = _f("none", "model", "store the frozen base linear layers as int8 or int4 (QLoRA-style, torchao "
                       "weight-only; the LoRA factors stay float32): none, int8, int4")
    bf16: str = _f("auto", "model", "bfloat16 autocast: auto (only on GPUs that support it), true, false")
    device: str = _f("auto", "model", "auto, cpu, cuda, cuda:1, ...")
    # data
    task: str = _f("arithmetic", "data", "built-in task (see `altlora list tasks`) or a .jsonl/.csv file")
    subtasks: list = _f([], "data", "arithmetic subtasks, e.g. 3_digit_addition,2_digit_multiplication")
    val_size: float = _f(0.05, "data", "validation split: fraction (<1) or count")
    test_size: float = _f(0.15, "data", "test split: fraction (<1) or count")
    data_seed: int = _f(0, "data", "seed of the fixed train/validation/test split")
    max_train_examples: int = _f(0, "data", "use at most this many training examples (0: all)")
    max_eval_examples: int = _f(0, "data", "evaluate on at most this many examples (0: all)")
    max_length: int = _f(128, "data", "truncate sequences to this many tokens")
    max_new_tokens: int = _f(0, "data", "generation length for exact match (0: longest answer + 12)")
    prompt_field: str = _f("prompt", "data", "JSONL field holding the prompt")
    completion_field: str = _f("completion", "data", "JSONL field holding the completion")
    text_field: str = _f("text", "data", "JSONL/CSV field holding the text to classify")
    label_field: str = _f("label", "data", "JSONL/CSV field holding the label")
    # lora
    r: int = _f(16, "lora", "LoRA rank")
    lora_alpha: float = _f(32.0, "lora", "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA)")
    lora_dropout: float = _f(0.0, "lora", "dropout on the LoRA input")
    target_modules: list = _f(["all-linear"], "lora", "modules to adapt, e.g. q_proj,v_proj, or all-linear")
    init_lora_weights: str = _f("default", "lora", "default, gaussian, pissa, olora, ... (PEFT's init_lora_weights)")
    lora_init: str = _f("", "lora", "Table 11 init of the factors 'A_init/B_init', e.g. spectral/zero (empty: PEFT's)")
    use_rslora: bool = _f(False, "lora", "rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = _f(False, "lora", "weight-decomposed LoRA (DoRA)")
    experts: int = _f(1, "lora", "LoRA experts per adapted linear layer, mixed by a router (1: plain LoRA; the "
                      "paper's Table 10)")
    router_top_k: int = _f(0, "lora", "with experts > 1: keep the k largest router gates per token (0: all)")
    router_aux_weight: float = _f(1e-4, "lora", "with experts > 1: weight of the router's balance loss")
    # optimizer
    optimizer: str = _f("altlora_plus", "optim", "method / optimizer name (see `altlora list methods`)")
    lr: float = _f(0.0, "optim", "peak learning rate (0: the method's default, see `altlora list methods`)")
    weight_decay: float = _f(0.0, "optim", "weight decay")
    optim_args: dict = _f({}, "optim", "extra optimizer hyper-parameters, e.g. mode=alternating,first=B")
    max_grad_norm: float = _f(1.0, "optim", "gradient clipping (0: off); AltLoRA/AltLoRA+ clip the full-weight "
                              "step of their projected gradient instead of the raw gradients")
    clip_in_optimizer: bool = _f(True, "optim", "let optimizers that clip in their own geometry (AltLoRA, "
                                 "AltLoRA+) take max_grad_norm; false: the loop clips raw gradients, as the Trainer does")
    lr_scheduler: str = _f("cosine", "optim", "transformers scheduler name: cosine, linear, constant_with_warmup, ...")
    warmup_ratio: float = _f(0.05, "optim", "fraction of the steps spent warming up")
    warmup_starts_at_zero: bool = _f(False, "optim", "true: the first warm-up step has lr 0, as in transformers' "
                                     "schedules; false: (t+1)/(W+1) of the peak at warm-up step t")
    init_batches: int = _f(4, "optim", "training micro-batches that gradient-based inits (lora_ga) estimate from")
    # training
    output_dir: str = _f("", "train", "where everything is written (empty: runs/<task>-<optimizer>)")
    batch_size: int = _f(16, "train", "examples per micro-batch")
    grad_accum: int = _f(1, "train", "micro-batches per optimizer step")
    max_steps: int = _f(150, "train", "optimizer steps (set 0 and use epochs instead)")
    epochs: float = _f(0.0, "train", "passes over the training data (used when max_steps is 0)")
    seed: int = _f(0, "train", "seed of LoRA init, data order and dropout")
    eval_every: int = _f(50, "train", "evaluate on the validation split every N steps (0: never)")
    eval_batch_size: int = _f(64, "train", "batch size for evaluation")
    eval_before: bool = _f(True, "train", "score the base model on the test split before training")
    save_every: int = _f(50, "train", "write a checkpoint every N steps (0: only the final adapter)")
    save_total_limit: int = _f(2, "train", "keep at most this many checkpoints")
    log_every: int = _f(5, "train", "write a metrics.jsonl row every N steps")
    tensorboard: bool = _f(False, "train", "also log to TensorBoard (needs the tensorboard package)")
    overwrite: bool = _f(False, "train", "replace a finished run in output_dir")
    resume: str = _f("", "train", "'latest' (or give --resume alone) or a checkpoint folder to continue from")
    stop_after_nonfinite: int = _f(10, "train", "stop when the loss has been non-finite for this many steps in a row "
                                   "(0: never)")
    threads: int = _f(0, "train", "torch CPU threads (0: torch's default)")
    nproc: int = _f(1, "train", "processes for DistributedDataParallel (re-launches under torchrun; same global batch)")

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HINTS = typing.get_type_hints(Config)
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
ALIASES = {"optim_notes": "optimizer", "method": "optimizer"}  # other flag names -> ours


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = _HINTS[key]

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {what}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad("true or false")
    if kind is int:
        try:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        except (TypeError, ValueError):
            raise bad("an integer") from None
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if kind is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise bad("a list of strings (or a comma-separated string)")
    if kind is dict:
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            out = {}
            for item in filter(None, (s.strip() for s in value.split(","))):
                k, sep, v = item.partition("=")
                if not sep:
                    raise bad("key=value pairs separated by commas")
                out[k.strip()] = yaml_value(v)
            return out
        raise bad("a mapping")
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, (str, int, float)):
        raise bad("a string")
    return str(value)


def _check_key(key: str, source: str) -> str:
    key = ALIASES.get(key, key)
    if key not in _FIELDS:
        raise ConfigError(f"{source}: unknown config key {key!r}.{closest(key, list(_FIELDS) + list(ALIASES))}"
                          " Run `altlora train --help` for the full list.")
    return key


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The config keys of a ``--config`` file, each checked against :class:`Config`."""
    return {_check_key(str(k), str(path)): v for k, v in read_yaml_mapping(path, "config file", "config keys").items()}


def add_config_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """One ``--key`` flag per Config field (default: not given), grouped by section."""
    groups: dict[str, Any] = {}
    for name, f in _FIELDS.items():
        if only is not None and name not in only:
            continue
        sec = f.metadata["section"]
        g = groups.get(sec) or groups.setdefault(sec, parser.add_argument_group(f"{sec} options"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{f.metadata['help']} (default: {default!r})"
        flags = [f"--{name}"] + [f"--{a}" for a, t in ALIASES.items() if t == name]
        if _HINTS[name] is bool:
            g.add_argument(*flags, dest=name, nargs="?", const="true", default=argparse.SUPPRESS,
                           metavar="true|false", help=help_)
            g.add_argument(f"--no-{name}", f"--no_{name}", dest=name, action="store_const", const="false",
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif name == "resume":
            g.add_argument(*flags, dest=name, nargs="?", const="latest", default=argparse.SUPPRESS, help=help_)
        else:
            g.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_)


def resolve_config(yaml_path: str | None, cli: dict[str, Any], cli_source: str = "command line") -> Config:
    """Defaults, then the YAML file, then ``cli`` values (only the keys the user gave); errors
    name ``cli_source`` as the origin of a ``cli`` value."""
    values = load_yaml(yaml_path) if yaml_path else {}
    source = {k: str(yaml_path) for k in values}
    for k, v in cli.items():
        k = _check_key(k, cli_source)
        values[k], source[k] = v, cli_source
    given = set(values)
    cfg = Config(**{k: _coerce(k, v, source[k]) for k, v in values.items()})
    if "epochs" in given and "max_steps" not in given:
        cfg.max_steps = 0  # asking for epochs replaces the default step budget
    if cfg.max_steps > 0 and cfg.epochs > 0:
        raise ConfigError("set either max_steps or epochs, not both")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise ConfigError("set max_steps > 0 or epochs > 0")
    if cfg.router_top_k < 0 or cfg.router_top_k > cfg.experts:
        raise ConfigError(f"router_top_k must be between 0 and experts ({cfg.experts}), got {cfg.router_top_k}")
    for k in ("r", "batch_size", "grad_accum", "nproc", "experts"):
        if getattr(cfg, k) < 1:
            raise ConfigError(f"{k} must be >= 1, got {getattr(cfg, k)}")
    if cfg.batch_size < cfg.nproc:
        raise ConfigError(f"batch_size {cfg.batch_size} is split across nproc {cfg.nproc} processes; "
                          "it must be at least nproc")
    _check_method(cfg.optimizer)
    if cfg.lr < 0:
        raise ConfigError(f"lr must be > 0 (or 0 for the method's default), got {cfg.lr}")
    if cfg.lr == 0:
        from . import methods

        cfg.lr = methods.get(cfg.optimizer).default_lr()
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / f"{Path(cfg.task).stem}-{cfg.optimizer}")
    from transformers import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if cfg.lr_scheduler not in schedulers:
        raise ConfigError(f"unknown lr_scheduler {cfg.lr_scheduler!r}; valid: {', '.join(schedulers)}."
                          f"{closest(cfg.lr_scheduler, schedulers)}")
    if cfg.quantize not in ("none", "int8", "int4"):
        raise ConfigError(f"quantize must be none, int8 or int4, got {cfg.quantize!r}{closest(cfg.quantize, ['int8', 'int4'])}")
    if cfg.quantize != "none" and cfg.optimizer in ("full", "adamw"):
        raise ConfigError("quantize freezes the base weights as integers; full fine-tuning trains them: pick a LoRA method")
    if cfg.bf16 not in ("auto", "true", "false"):
        raise ConfigError(f"bf16 must be auto, true or false, got {cfg.bf16!r}")
    return cfg


def _check_method(name: str) -> None:
    from . import methods

    if name not in methods.names(include_aliases=True):
        valid = methods.names(include_aliases=True)
        raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(valid)}.{closest(name, valid)}")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.fields(), sort_keys=False))
