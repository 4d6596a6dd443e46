"""``create_optimizer(model, name=...)``: build any registered optimizer for a LoRA model."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .optim import (AdaLoRAAdamW, AltLoRA, AltLoRAPlus, LoRAPlus, LoRAPro, LoRAProSGD, LoRARite,
                    ScaledAdamW, ScaledGD)
from .validate import closest

__all__ = ["OPTIMIZERS", "create_optimizer", "register_optimizer"]


def _lora_adamw(model: nn.Module, lr: float = 1e-3, **kwargs: Any) -> torch.optim.Optimizer:
    """Plain LoRA (or full fine-tuning on an unadapted model): torch AdamW on every trainable tensor."""
    kwargs.setdefault("weight_decay", 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, **kwargs)


# name -> (builder(model, lr, **hyperparams), one-line description)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], str]] = {
    "altlora": (AltLoRA, "AltLoRA (Algorithm 1): alternating projected gradients with projected momentum"),
    "altlora_plus": (AltLoRAPlus, "AltLoRA+ (Algorithm 2): AltLoRA plus an unprojected second moment"),
    "lora": (_lora_adamw, "LoRA: AdamW on the LoRA factors and other trainable tensors"),
    "adamw": (_lora_adamw, "AdamW on every trainable tensor (full fine-tuning on an unadapted model)"),
    "lora_plus": (LoRAPlus, "LoRA+: AdamW with lr for A and ratio * lr for B (weight decay honoured)"),
    "scaled_gd": (ScaledGD, "ScaledGD: r x r Riemannian-preconditioned gradient descent on A and B"),
    "scaled_adamw": (ScaledAdamW, "Scaled AdamW: AdamW on Riemannian-preconditioned LoRA gradients"),
    "lora_rite": (LoRARite, "LoRA-RITE: transformation-invariant adaptive moments in the factors' bases"),
    "lora_pro": (LoRAPro, "LoRA-Pro (AdamW): Adam on the k x d equivalent gradient, Sylvester-optimal X"),
    "lora_pro_sgd": (LoRAProSGD, "LoRA-Pro (SGD): tangent-space-projected full gradient step"),
    "adalora": (AdaLoRAAdamW, "AdaLoRA: AdamW plus PEFT's rank allocator after every step"),
}


def register_optimizer(name: str, builder: Callable[..., torch.optim.Optimizer], description: str) -> None:
    """Add ``builder(model, lr=..., **hyperparams)`` under ``name``."""
    OPTIMIZERS[name] = (builder, description)


def create_optimizer(model: nn.Module, name: str = "altlora", lr: float = 1e-3,
                     **hyperparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` for ``model``.

    >>> opt = create_optimizer(peft_model, "altlora_plus", lr=1e-4, first="B")
    """
    if name not in OPTIMIZERS:
        valid = ", ".join(sorted(OPTIMIZERS))
        raise ValueError(f"unknown optimizer {name!r}; valid names: {valid}.{closest(name, OPTIMIZERS)}")
    builder, _ = OPTIMIZERS[name]
    return builder(model, lr=lr, **hyperparams)
