"""Models: resolve a name or folder, load it for a task kind, adapt it for a method, save it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import TaskType
from torch import nn

from .assets import ASSETS, asset_path
from .methods import Method

__all__ = ["BUILTIN_MODELS", "ModelError", "resolve_model", "load_model", "lora_options", "adapt",
           "moves_base_weights", "save_trained", "load_adapted", "META_FILE"]

BUILTIN_MODELS = {n: a.description for n, a in ASSETS.items() if a.kind == "model"}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
META_FILE = "altlora.json"  # written next to a trained model: base model, task kind, labels, method


class ModelError(ValueError):
    """A model name or folder is unusable."""


def resolve_model(name: str) -> Path:
    """Built-in model name -> cached folder (fetched if needed); a folder -> itself, checked."""
    if name in BUILTIN_MODELS:
        return asset_path(name)
    p = Path(name).expanduser()
    if not p.is_dir():
        from .validate import closest
        raise ModelError(f"unknown model {name!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}) "
                         f"and not an existing folder.{closest(name, BUILTIN_MODELS)}")
    if not (p / "config.json").is_file():
        raise ModelError(f"model folder {p} has no config.json; expected a Hugging Face model folder "
                         "(config.json, model.safetensors, tokenizer files)")
    if not any((p / w).is_file() for w in _WEIGHTS):
        raise ModelError(f"model folder {p} has no weights: expected one of {', '.join(_WEIGHTS)}")
    return p


def load_model(path: Path, kind: str, labels: list[str] | None = None) -> tuple[nn.Module, Any]:
    """Load a causal LM (kind 'generation') or a sequence classifier with a fresh head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if kind == "generation":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        labels = labels or []
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


#: --quantize choices: torchao weight-only configs for the frozen base's linear layers
QUANTIZE = ("none", "int8", "int4")


def quantize_base(model: nn.Module, how: str) -> nn.Module:
    """Quantize the base model's linear layers in place (QLoRA-style: the frozen weights are
    stored as integers, the LoRA factors trained on top stay float32), with torchao's weight-only
    configs, which run on CPU: ``int8`` (8-bit storage) or ``int4`` (4-bit values; torchao's CPU
    layout keeps them unpacked in int8, so memory is that of int8). The output layer and a
    classification head stay in float (they are trained, or tied to the embeddings)."""
    if how == "none":
        return model
    if how not in QUANTIZE:
        raise ModelError(f"unknown quantization {how!r}; valid: {', '.join(QUANTIZE)}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    except ImportError:
        raise ModelError("quantize needs torchao: pip install 'altlora[quant]'") from None
    config = Int8WeightOnlyConfig() if how == "int8" else IntxWeightOnlyConfig(weight_dtype=torch.int4)
    heads = {id(m) for m in (model.get_output_embeddings(), getattr(model, "classifier", None),
                             getattr(model, "score", None)) if m is not None}
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and id(m) not in heads)
    return model


def lora_options(cfg, kind: str) -> dict[str, Any]:
    """``LoraConfig`` fields from the run config; switches left at their defaults are omitted,
    so a method that fixes them (``rslora``, ``dora``, ``pissa``) keeps its own values."""
    targets = cfg.target_modules
    options: dict[str, Any] = dict(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type=TaskType.CAUSAL_LM if kind == "generation" else TaskType.SEQ_CLS,
    )
    init = {"default": None, "true": True, "false": False}.get(cfg.init_lora_weights.lower(), cfg.init_lora_weights)
    if init is not None:
        options["init_lora_weights"] = init
    if cfg.use_rslora:
        options["use_rslora"] = True
    if cfg.use_dora:
        options["use_dora"] = True
    return options


def adapt(model: nn.Module, method: Method, cfg, kind: str, *, total_steps: int,
          init_batches: list[dict] | None = None) -> nn.Module:
    """``method.adapt`` with the run's LoRA settings (``full`` trains every weight instead)."""
    try:
        if method.adapter == "full":
            return method.adapt(model, experts=cfg.experts)
        return method.adapt(model, lora_options(cfg, kind), init=cfg.lora_init or None,
                            total_steps=total_steps, init_batches=init_batches, experts=cfg.experts,
                            router_top_k=cfg.router_top_k)
    except ValueError as e:  # e.g. target modules not found: say which model
        raise ModelError(f"cannot adapt {type(model).__name__} for method {method.name!r}: {e}") from None


def moves_base_weights(model: nn.Module) -> bool:
    """True for inits that rewrite the frozen weights (PiSSA, OLoRA, CorDA, LoRA-GA): their
    adapters must be converted against the initial adapter to apply to the original model."""
    config = getattr(model, "peft_config", {}).get("default")
    init = str(getattr(config, "init_lora_weights", "")).lower()
    return init.startswith(("pissa", "olora", "corda", "lora_ga"))


def save_trained(model: nn.Module, tokenizer, folder: Path, meta: dict, initial_adapter: Path | None) -> None:
    """The trained adapter (``save_pretrained``), or the whole model after full fine-tuning,
    plus the tokenizer and ``altlora.json`` (base model, task kind, labels, method)."""
    if initial_adapter is not None:
        model.save_pretrained(folder, path_initial_model_for_weight_conversion=str(initial_adapter))
    else:
        model.save_pretrained(folder)
    if meta.get("experts", 1) > 1:
        from .moe import save_settings

        save_settings(folder, meta["experts"], meta.get("router_top_k", 0))
    tokenizer.save_pretrained(folder)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def load_adapted(folder: Path) -> tuple[nn.Module, Any, dict]:
    """The trained model in a folder written by ``altlora train`` (base model + adapter, or
    the fully fine-tuned model), its tokenizer and its ``altlora.json``."""
    from peft import PeftModel

    meta_path = Path(folder) / META_FILE
    if not meta_path.is_file():
        raise ModelError(f"{folder} was not written by `altlora train` (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("full"):
        model, tok = load_model(Path(folder), meta["kind"], meta.get("labels"))
        return model, tok, meta
    model, tok = load_model(resolve_model(meta["model_path"]), meta["kind"], meta.get("labels"))
    model = quantize_base(model, meta.get("quantize", "none"))  # the base the adapter was trained on
    if meta.get("experts", 1) > 1:  # PEFT must be told how to rebuild the routed layers
        from .moe import load_adapter

        return load_adapter(model, folder), tok, meta
    return PeftModel.from_pretrained(model, folder), tok, meta
