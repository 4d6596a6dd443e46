"""``create_optimizer(model, name=...)``: build any registered optimizer for a LoRA model."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .optim import AltLoRA, AltLoRAPlus
from .optim.paired import closest

__all__ = ["OPTIMIZERS", "create_optimizer", "register_optimizer"]


def _lora_adamw(model: nn.Module, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """Plain LoRA: torch AdamW on every trainable tensor."""
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
