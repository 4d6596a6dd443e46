"""AdaLoRA's optimizer: torch AdamW followed by PEFT's rank allocator after every step.

AdaLoRA (``peft.AdaLoraConfig``) parametrises ``W = W0 + s P diag(E) Q`` and prunes the
singular values ``E`` by importance; PEFT requires ``model.base_model.update_and_allocate(t)``
after ``optimizer.step()`` and before ``zero_grad()`` at every step, which training loops
forget. :class:`AdaLoRAAdamW` makes that call itself, with the step index kept in
``param_groups[0]["allocator_step"]``. Its ``state_dict`` also carries the allocator's state,
which lives in the PEFT model (the importance EMAs and the current rank pattern), so a resumed
run allocates exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .sharding import is_dtensor

__all__ = ["AdaLoRAAdamW", "find_allocator"]


def find_allocator(model: nn.Module):
    """The object that owns ``update_and_allocate`` (PEFT's ``AdaLoraModel``), or raise."""
    for candidate in (model, getattr(model, "base_model", None)):
        if candidate is not None and callable(getattr(candidate, "update_and_allocate", None)):
            return candidate
    raise ValueError(
        f"{type(model).__name__} is not an AdaLoRA model (no update_and_allocate): adapt it with "
        "methods.get('adalora').adapt(model, total_steps=...) or peft.get_peft_model(model, AdaLoraConfig(...))."
    )


class AdaLoRAAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` on the trainable tensors of an AdaLoRA model + the allocator call."""

    name = "adalora"
    description = "AdaLoRA: SVD-form adapter with importance-based rank allocation, AdamW"
    adapter = "adalora"  # how methods.get("adalora") adapts the model
    requires = ("total_steps",)

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        self._allocator = find_allocator(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if any(is_dtensor(p) for p in params):
            raise NotImplementedError(
                "AdaLoRA's rank allocator (peft update_and_allocate) does not support FSDP2-sharded "
                "(DTensor) parameters; train AdaLoRA under DDP (torchrun / accelerate launch) instead.")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.param_groups[0].setdefault("allocator_step", 0)

    def _adapter(self) -> tuple[Any, Any]:
        """PEFT's RankAllocator and the AdaLoraConfig it allocates for."""
        owner = self._allocator
        return owner.rankallocator, owner.peft_config[owner.trainable_adapter_name]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        allocator, config = self._adapter()
        state["adalora_allocator"] = {
            "ipt": dict(allocator.ipt), "exp_avg_ipt": dict(allocator.exp_avg_ipt),
            "exp_avg_unc": dict(allocator.exp_avg_unc), "rank_pattern": config.rank_pattern}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("adalora_allocator", None)
        super().load_state_dict(state_dict)
        if saved is not None:
            allocator, config = self._adapter()
            device = self.param_groups[0]["params"][0].device
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                setattr(allocator, key, {n: t.to(device) for n, t in saved[key].items()})
            config.rank_pattern = saved["rank_pattern"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        group = self.param_groups[0]
        self._allocator.update_and_allocate(group["allocator_step"])  # reads .grad: before zero_grad
        group["allocator_step"] += 1
        return loss
