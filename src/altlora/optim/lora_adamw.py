"""Plain LoRA: ``torch.optim.AdamW`` on every trainable tensor of a model (the paper's LoRA row).

On an unadapted model it is full fine-tuning (the research code's ``adamw``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["LoRAAdamW"]


class LoRAAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(trainable parameters of model, ...)``, weight decay 0 by default (the
    Hugging Face convention for LoRA) instead of torch's 0.01."""

    name = "lora"
    aliases = ("adamw",)
    description = "LoRA: PEFT LoRA (Kaiming A, zero B) trained by AdamW"

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else list(model)
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if any("lora" in g for g in state_dict.get("param_groups", [])):
            raise ValueError("LoRAAdamW.load_state_dict: this state was saved by a pair-aware altlora optimizer "
                             "(AltLoRA, LoRA+, ...), not by AdamW; resume with the optimizer that saved it")
        super().load_state_dict(state_dict)
