"""LoRA+ (Hayou, Ghosh, Yu, ICML 2024): AdamW with a larger learning rate for B.

With ``W = W0 + s B A``, ``A`` (r, d) the input factor and ``B`` (k, r) the output factor (the
zero-initialised one under PEFT), every tensor follows AdamW:

    p <- p (1 - eta_p wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - eta_p (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

with ``eta_A = lr`` and ``eta_B = ratio * lr`` (``ratio`` = ``loraplus_lr_ratio``, default 16).
Pairs come from the model's structure (not from ``"lora_B" in name``). Other trainable tensors
use ``aux_lr`` (default ``lr``), and, as PEFT's ``create_loraplus_optimizer`` does,
1-D ones (biases, DoRA magnitudes) use ``ratio * aux_lr`` unless ``ratio_on_vectors=False``.

``lr_embedding`` (PEFT's ``loraplus_lr_embedding``, 1e-6 there) gives both factors of LoRA
pairs on ``nn.Embedding`` layers their own rate; by default they follow the A/B rule.

Unlike PEFT's factory, ``weight_decay`` is honoured (PEFT overrides it with
``loraplus_weight_decay``, default 0, so ``weight_decay=0.01`` silently becomes 0 there).
"""

from __future__ import annotations

from typing import Any

import torch

from ..validate import check_betas, check_range
from .paired import Clip, PairedOptimizer
from .sharding import all_finite_everywhere

__all__ = ["LoRAPlus"]


class LoRAPlus(PairedOptimizer):
    r"""LoRA+: AdamW with learning rate ``lr`` for A and ``ratio * lr`` for B.

    Args:
        params: an ``nn.Module`` or parameters / groups with ``model=`` or ``pairs=``.
        lr: learning rate of A (read from ``group["lr"]`` each step, so schedulers work).
        ratio: ``eta_B / eta_A`` (LoRA+'s lambda; 16 is the common default, >= 1 advised).
        betas, eps: Adam coefficients.
        weight_decay: decoupled weight decay on A and B (also the default ``aux_weight_decay``).
        ratio_on_vectors: give 1-D non-LoRA tensors ``ratio * aux_lr`` (PEFT's rule).
        lr_embedding: learning rate of both factors of Embedding LoRA pairs (scaled by the
            scheduler like ``lr``); ``None`` = the A/B rule.
        aux_lr, aux_betas, aux_eps, aux_weight_decay, ...: see
            :class:`~altlora.optim.paired.PairedOptimizer` (defaults: lr, betas, eps, weight_decay).
    """

    name = "lora_plus"
    description = "LoRA+: AdamW with lr for A and ratio * lr for B (weight decay honoured)"

    def __init__(self, params: Any = None, lr: float = 1e-4, *, ratio: float = 16.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, ratio_on_vectors: bool = True,
                 lr_embedding: float | None = None, aux_betas: tuple[float, float] | None = None,
                 aux_eps: float | None = None, aux_weight_decay: float | None = None, **kwargs: Any) -> None:
        check_range("ratio", ratio, 0.0, None)
        check_betas("betas", betas)
        check_range("eps", eps, 0.0, None)
        check_range("weight_decay", weight_decay, 0.0, None)
        if lr_embedding is not None:
            check_range("lr_embedding", lr_embedding, 0.0, None)
        self.ratio_on_vectors = bool(ratio_on_vectors)
        super().__init__(
            params, dict(lr=lr, ratio=float(ratio), betas=tuple(betas), eps=eps, weight_decay=weight_decay),
            aux_betas=tuple(betas if aux_betas is None else aux_betas), aux_eps=eps if aux_eps is None else aux_eps,
            aux_weight_decay=weight_decay if aux_weight_decay is None else aux_weight_decay, **kwargs)
        for group, pairs in zip(self.param_groups, self._sources):
            if pairs is not None:  # plain metadata, saved with the group
                group["embedding_pairs"] = [pr.kind == "embedding" for pr in pairs]
                group["embedding_lr_ratio"] = None if lr_embedding is None else lr_embedding / lr if lr else 0.0

    def _read(self, group: dict) -> list[dict]:
        return [group]  # every factor is its own AdamW tensor: one work item per group

    def _compute(self, group: dict, work: dict, clip: Clip) -> list[bool]:
        """Per pair: are both gradients finite (on every rank)? A pair without gradients counts as
        finite. Raises under ``on_nonfinite="raise"``."""
        ps = group["params"]
        grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in ps]
        flags = all_finite_everywhere(grads).view(-1, 2).all(1)
        self._raise_if_nonfinite(group, list(range(len(flags))), flags, "factors A, B")
        return flags

    def _apply(self, group: dict, work: dict, flags: torch.Tensor) -> None:
        """AdamW on each factor at its lr (lr for A, ratio * lr for B); non-finite pairs are skipped
        and counted on A's state."""
        ps, lr = group["params"], group["lr"]  # [A1, B1, A2, B2, ...]
        ok = flags.tolist()
        states = [self.state[A] for A in ps[0::2]]
        for st in states:  # always there: checkpoint tools expect the same keys at every step
            st.setdefault("nonfinite_skips", torch.zeros((), dtype=torch.int64, device=ps[0].device))
        if not all(ok):
            self._count_skips(states, flags.to(states[0]["nonfinite_skips"].device))
        emb = group.get("embedding_pairs") or [False] * (len(ps) // 2)
        special = group.get("embedding_lr_ratio") is not None
        for factor, factor_lr in ((0, lr), (1, lr * group["ratio"])):
            self._aux_step({**group, "lr": factor_lr, "params": [
                p for p, e, good in zip(ps[factor::2], emb, ok) if good and not (special and e)]})
        if special:
            self._aux_step({**group, "lr": lr * group["embedding_lr_ratio"],
                            "params": [p for i, p in enumerate(ps) if emb[i // 2] and ok[i // 2]]})

    def _aux_step(self, group: dict, coef: torch.Tensor | None = None) -> None:
        if group.get("lora") or not self.ratio_on_vectors:
            return super()._aux_step(group, coef)
        ps = group["params"]
        super()._aux_step({**group, "params": [p for p in ps if p.dim() != 1]}, coef)
        super()._aux_step({**group, "params": [p for p in ps if p.dim() == 1],
                           "lr": group["lr"] * group["ratio"]}, coef)
