"""Functional AdamW for the tensors that are not LoRA factors (heads, biases, DoRA magnitudes).

Same arithmetic and order as ``torch.optim.AdamW`` (decoupled decay, then the moment
updates, then ``p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``), but the moments may be
kept in float32 while the parameters are bf16/fp16.
"""

from __future__ import annotations

import math

import torch


def adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on lists of tensors; ``steps`` are CPU 0-d counters, incremented here."""
    if not params:
        return
    torch._foreach_add_(steps, 1)
    grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    # Parameters whose dtype differs from the state are updated through a float copy.
    work = [p if p.dtype == m.dtype else p.to(m.dtype) for p, m in zip(params, exp_avgs)]

    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)

    counts = [s.item() for s in steps]  # CPU tensors: no device synchronisation
    step_sizes = [-lr / (1 - beta1**c) for c in counts]
    bc2_sqrt = [math.sqrt(1 - beta2**c) for c in counts]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work, exp_avgs, denom, step_sizes)

    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)
