"""``create_optimizer(model, name=...)``: build any registered optimizer for a LoRA model."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .optim import REGISTRY
from .validate import closest

__all__ = ["OPTIMIZERS", "create_optimizer", "register_optimizer"]

#: name -> (builder(model, lr, **hyperparams), one-line description): the optimizer classes of
#: :data:`altlora.optim.REGISTRY` (each class's ``name``, ``aliases`` and ``description``), plus
#: whatever :func:`register_optimizer` adds
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], str]] = {
    name: (cls, cls.description) for name, cls in REGISTRY.items()}


def register_optimizer(name: str, builder: Callable[..., torch.optim.Optimizer], description: str) -> None:
    """Add ``builder(model, lr=..., **hyperparams)`` under ``name``."""
    OPTIMIZERS[name] = (builder, description)


def create_optimizer(model: torch.nn.Module, name: str = "altlora", lr: float | None = None,
                     **hyperparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` for ``model`` (``lr`` None: its default).

    >>> opt = create_optimizer(peft_model, "altlora_plus", lr=1e-3, mode="alternating")
    """
    if name not in OPTIMIZERS:
        valid = ", ".join(sorted(OPTIMIZERS))
        raise ValueError(f"unknown optimizer {name!r}; valid names: {valid}.{closest(name, OPTIMIZERS)}")
    builder, _ = OPTIMIZERS[name]
    return builder(model, **({} if lr is None else {"lr": lr}), **hyperparams)
