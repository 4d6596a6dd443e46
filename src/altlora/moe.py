"""Mixture-of-LoRA-experts adapters: the paper's Table 10 ("Mixture of LoRA experts", Wu et al.).

Each adapted linear layer holds ``E`` LoRA experts ``(A_e, B_e)`` (r x d and k x r, one scaling
``s`` as in LoRA) and a router, a linear map from the layer input to E logits::

    y = W0 x + s * sum_e g_e(x) B_e A_e x,     g(x) = softmax(router(x))          (per token)

With ``top_k > 0`` only the k largest gates of a token are kept and renormalised. Every expert is
an ordinary LoRA pair, so every optimizer of this library finds and trains the experts by
structure (:func:`altlora.pairing.find_lora_pairs`); the router is an extra tensor for the
AdamW group. The router's balance loss, :func:`router_loss`, is the negative entropy of the
mean gate distribution over a batch's tokens, ``sum_e p_e log p_e + log E`` with
``p = mean_t g(x_t)``: 0 when every expert gets the same share, ``log E`` when one takes all.
Training adds ``router_aux_weight * router_loss(model)`` to the loss (the paper's entropy
regularisation, weight 1e-4); the paper gives the idea, not the formula, so this is ours.

The layer plugs into PEFT as a custom module (``LoraConfig._register_custom_module``), so
``get_peft_model``, ``save_pretrained`` and (with :func:`load_adapter`) ``from_pretrained`` work
as for LoRA; merging is not defined for a routed adapter and is refused.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

__all__ = ["MoELoraLinear", "MOE_FILE", "register", "router_loss", "load_adapter", "is_moe"]

#: written next to a saved MoE adapter: how to rebuild its layers on load
MOE_FILE = "altlora_moe.json"


class MoELoraLinear(nn.Module, LoraLayer):
    """E LoRA experts with a softmax router on one ``nn.Linear`` (see the module docstring)."""

    adapter_layer_names = ("lora_experts_A", "lora_experts_B", "lora_router")
    other_param_names = LoraLayer.other_param_names + ("num_experts", "top_k")

    def __init__(self, base_layer: nn.Module, adapter_name: str, *, num_experts: int, top_k: int = 0,
                 r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, init_lora_weights: bool | str = True,
                 use_rslora: bool = False, use_dora: bool = False, lora_bias: bool = False,
                 fan_in_fan_out: bool = False, config: Any = None, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        unsupported = {"use_dora": use_dora, "lora_bias": lora_bias, "fan_in_fan_out": fan_in_fan_out,
                       "init_lora_weights": init_lora_weights not in (True, "default")}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"mixture-of-LoRA-experts layers support plain LoRA only; unset {bad} (or use experts=1)")
        self.num_experts: dict[str, int] = {}
        self.top_k: dict[str, int] = {}
        self.lora_experts_A = nn.ModuleDict()
        self.lora_experts_B = nn.ModuleDict()
        self.lora_router = nn.ModuleDict()
        self.router_losses: dict[str, torch.Tensor] = {}  # of the last forward; not state
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                          num_experts=num_experts, top_k=top_k)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool | str, use_rslora: bool, *, num_experts: int | None = None,
                     top_k: int | None = None, **kwargs: Any) -> None:
        num_experts = num_experts or next(iter(self.num_experts.values()))
        top_k = next(iter(self.top_k.values()), 0) if top_k is None else top_k
        if r <= 0 or num_experts < 1 or not 0 <= top_k <= num_experts:
            raise ValueError(f"need r >= 1, num_experts >= 1 and 0 <= top_k <= num_experts; got r={r}, "
                             f"num_experts={num_experts}, top_k={top_k}")
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.use_rslora[adapter_name] = use_rslora
        self.num_experts[adapter_name], self.top_k[adapter_name] = num_experts, top_k
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        d, k = self.in_features, self.out_features
        experts_A = nn.ModuleList(nn.Linear(d, r, bias=False) for _ in range(num_experts))
        experts_B = nn.ModuleList(nn.Linear(r, k, bias=False) for _ in range(num_experts))
        for a, b in zip(experts_A, experts_B):  # PEFT's LoRA init: Kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        router = nn.Linear(d, num_experts, bias=False)
        nn.init.zeros_(router.weight)  # uniform gates at the start
        self.lora_experts_A[adapter_name], self.lora_experts_B[adapter_name] = experts_A, experts_B
        self.lora_router[adapter_name] = router
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def gates(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """Softmax gates (..., E) of the (dropped-out) input ``h``, top-k sparsified if asked."""
        g = torch.softmax(self.lora_router[adapter_name](h), dim=-1)
        k = self.top_k[adapter_name]
        if 0 < k < g.shape[-1]:
            kept = torch.zeros_like(g).scatter(-1, g.topk(k, dim=-1).indices, 1.0)
            g = g * kept
            g = g / g.sum(-1, keepdim=True)
        return g

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_experts_A:
                continue
            experts_A, experts_B = self.lora_experts_A[name], self.lora_experts_B[name]
            h = self.lora_dropout[name](x.to(self.lora_router[name].weight.dtype))
            g = self.gates(name, h)
            mixed = sum(g[..., e:e + 1] * b(a(h)) for e, (a, b) in enumerate(zip(experts_A, experts_B)))
            result = result + (self.scaling[name] * mixed).to(result.dtype)
            mean = g.reshape(-1, g.shape[-1]).mean(0)
            self.router_losses[name] = (mean * mean.clamp_min(1e-12).log()).sum() + math.log(g.shape[-1])
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("a mixture-of-LoRA-experts adapter cannot be merged into the base weights: its "
                                  "update depends on the input through the router; keep it as an adapter")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError("a mixture-of-LoRA-experts layer has no single delta weight (it is routed)")

    def __repr__(self) -> str:
        return "moe_lora." + super().__repr__()


def register(lora_config: Any, num_experts: int, top_k: int = 0) -> Any:
    """Make PEFT build :class:`MoELoraLinear` for the ``nn.Linear`` targets of ``lora_config``."""
    lora_config._register_custom_module({nn.Linear: functools.partial(MoELoraLinear, num_experts=num_experts,
                                                                      top_k=top_k)})
    return lora_config


def is_moe(model: nn.Module) -> bool:
    return any(isinstance(m, MoELoraLinear) for m in model.modules())


def router_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean router balance loss over the MoE layers of ``model`` from its last forward (None if
    it has none). Add ``router_aux_weight * router_loss(model)`` to the training loss."""
    losses = [loss for m in model.modules() if isinstance(m, MoELoraLinear)
              for name, loss in m.router_losses.items() if name in m.active_adapters]
    return torch.stack(losses).mean() if losses else None


def save_settings(folder: str | Path, num_experts: int, top_k: int) -> None:
    """Write :data:`MOE_FILE` next to a saved adapter, so :func:`load_adapter` can rebuild it."""
    Path(folder, MOE_FILE).write_text(json.dumps({"num_experts": num_experts, "top_k": top_k}))


def load_adapter(base_model: nn.Module, folder: str | Path, **kwargs: Any) -> nn.Module:
    """``PeftModel.from_pretrained`` for an adapter saved with MoE layers (reads :data:`MOE_FILE`)."""
    from peft import PeftConfig, PeftModel

    settings = json.loads(Path(folder, MOE_FILE).read_text())
    config = register(PeftConfig.from_pretrained(str(folder)), settings["num_experts"], settings["top_k"])
    return PeftModel.from_pretrained(base_model, str(folder), config=config, **kwargs)
