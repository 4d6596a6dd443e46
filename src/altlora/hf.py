"""Hugging Face ``Trainer`` integration: an optimizer factory and a logging callback.

With any method of the registry (:mod:`altlora.methods`, aliases included)::

    from altlora.hf import ClipHandoverCallback, OptimizerFactory, OptimizerLogCallback
    trainer = Trainer(
        model=peft_model, args=TrainingArguments(...), train_dataset=...,
        optimizer_cls_and_kwargs=(OptimizerFactory, {"name": "altlora_plus", "lr": 2e-4}),
        callbacks=[ClipHandoverCallback(), OptimizerLogCallback()],
    )

The Trainer (transformers >= 5) treats a class that is not a ``torch.optim.Optimizer`` as a
factory: it calls ``OptimizerFactory()(model, **kwargs)`` with the unwrapped model, under
single-process, DDP and FSDP2 runs alike, so the optimizer sees the LoRA structure. The kwargs
arrive as given: the Trainer does not inject ``learning_rate`` or ``weight_decay``, and its
scheduler drives the ``lr`` of every param group.

Plain PyTorch loops and accelerate need nothing from this module: build the optimizer with
``altlora.methods.get(name).create_optimizer(model, lr=...)`` (accelerate: before
``accelerator.prepare``) and log :func:`altlora.metrics.optimizer_log_fields`; see
``docs/integrations.md``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from . import methods
from .metrics import optimizer_log_fields, unwrap_optimizer

__all__ = ["ClipHandoverCallback", "OptimizerFactory", "OptimizerLogCallback"]

logger = logging.getLogger(__name__)


class OptimizerFactory:
    """``Trainer(optimizer_cls_and_kwargs=(OptimizerFactory, {"name": ..., "lr": ..., **hparams}))``.

    ``name`` is a method of :mod:`altlora.methods` (``altlora_plus``, ``lora_rite``, the research
    code's ``adamw``, ...); its optimizer defaults apply unless ``hparams`` override them. The
    model must already be adapted for the method (``methods.get(name).adapt(model, ...)``).
    """

    def __call__(self, model: nn.Module, name: str = "altlora", lr: float | None = None,
                 **hparams: Any) -> torch.optim.Optimizer:
        """``lr`` None: the method's default (AltLoRA's is a weight-space step size, 0.3, not the
        Trainer's ``learning_rate``, which is never read)."""
        return methods.get(name).create_optimizer(model, lr=lr, **hparams)


class ClipHandoverCallback(TrainerCallback):
    """Hands the Trainer's gradient clipping to optimizers that clip in their own geometry.

    The Trainer clips the raw gradients of every parameter to ``args.max_grad_norm`` (1.0 by
    default) before ``optimizer.step()``. AltLoRA's step is a projected-gradient step in weight
    space, so that clip scales the step directly, by whichever factor's gradient is larger, and
    breaks its transformation invariance. At the start of training this callback moves the
    Trainer's value to such an optimizer (``optimizer.max_grad_norm``: the norm of the
    full-weight step of each pair, see :func:`altlora.optim.altlora.lifted_sq_norms`; 0 turns
    its clipping off too) and sets the Trainer's to 0, saying so once in the log: the
    Trainer's ``max_grad_norm`` stays the one clipping setting. Other optimizers keep the
    Trainer's clipping.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer) if optimizer is not None else None
        if not getattr(opt, "clips_in_own_geometry", False):
            return
        opt.max_grad_norm = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        logger.warning(
            "altlora: TrainingArguments.max_grad_norm=%g handed to %s, which clips the full-weight step of each "
            "LoRA pair; the Trainer's clipping of raw gradients is off", args.max_grad_norm, type(opt).__name__)
        args.max_grad_norm = 0.0


class OptimizerLogCallback(TrainerCallback):
    """Adds ``optim/phase`` (the factor the logged step updated), the worst Gram conditions and
    the skipped-step count to every training-step log, and appends them to
    ``<output_dir>/optimizer_stats.jsonl`` on the main process."""

    def __init__(self) -> None:
        self.last_phase: str | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.last_phase = optimizer_log_fields(optimizer, with_stats=False).get("phase")

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if optimizer is None or logs is None or "loss" not in logs:
            return  # evaluation and end-of-training summaries are not optimizer steps
        fields = optimizer_log_fields(optimizer)
        if self.last_phase is not None:
            fields["phase"] = self.last_phase
        logs.update({f"optim/{k}": v for k, v in fields.items()})
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "optimizer_stats.jsonl"), "a") as f:
                f.write(json.dumps({"step": state.global_step, **fields}) + "\n")
