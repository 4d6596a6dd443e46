"""Find LoRA factor pairs by model structure, never by parameter order.

A LoRA pair is the two factors of one adapted weight ``W = W0 + s * B @ A`` with
``A`` of shape ``(r, d)`` (input side) and ``B`` of shape ``(k, r)`` (output side).
Every supported layer kind reduces to that matrix form:

==============  ==============================  ==============================
layer kind      A as stored -> matrix           B as stored -> matrix
==============  ==============================  ==============================
Linear/Conv1D   ``lora_A.<ad>.weight`` (r, d)   ``lora_B.<ad>.weight`` (k, r)
Embedding       ``lora_embedding_A.<ad>`` (r,V)  ``lora_embedding_B.<ad>`` (D,r)
Conv1d/2d/3d    (r, in, *kernel) -> (r, in*kh*kw)  (out, r, 1, 1) -> (out, r)
==============  ==============================  ==============================

The scaling ``s`` is read from ``module.scaling[adapter]`` at every optimizer step,
so rsLoRA, ``rank_pattern``/``alpha_pattern`` and ``set_scale`` are honoured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn

ScalingLike = Union[float, Callable[[], float]]

__all__ = ["LoRAPair", "LoRAPairingError", "find_lora_pairs", "as_pairs", "as_matrix"]


class LoRAPairingError(ValueError):
    """The model's LoRA structure could not be turned into (A, B) pairs."""


@dataclass(eq=False)
class LoRAPair:
    """One LoRA factor pair ``(A, B)`` with its scaling.

    ``scaling`` is either a number or a zero-argument callable that returns the
    current scaling (PEFT pairs read ``module.scaling[adapter]`` through it).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: ScalingLike = 1.0
    name: str = ""
    adapter: str = ""
    kind: str = "linear"
    a_name: str = field(default="", repr=False)
    b_name: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        validate_pair_shapes(self.A, self.B, self.name or "explicit pair")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def current_scaling(self) -> float:
        s = self.scaling() if callable(self.scaling) else self.scaling
        return float(s)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a stored factor as a matrix with its first dimension kept: (r, in*kh*kw) or (k, r)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def validate_pair_shapes(A: torch.Tensor, B: torch.Tensor, where: str) -> None:
    if A.dim() < 2 or B.dim() < 2:
        raise LoRAPairingError(
            f"{where}: LoRA factors must be at least 2-D, got A{tuple(A.shape)} and B{tuple(B.shape)}. "
            "1-D tensors usually mean DeepSpeed ZeRO flattened the parameters, which matrix-aware "
            "optimizers cannot see; use DDP or FSDP2 instead."
        )
    r = A.shape[0]
    b = as_matrix(B)
    if b.shape[1] != r:
        raise LoRAPairingError(
            f"{where}: A has shape {tuple(A.shape)} (rank {r} in dim 0) but B has shape "
            f"{tuple(B.shape)}, which is not (k, {r}) after flattening trailing dims. "
            "Pass pairs as (A, B) with A of shape (r, d) and B of shape (k, r)."
        )


def _scaling_reader(module: nn.Module, adapter: str) -> Callable[[], float]:
    def read() -> float:
        return module.scaling[adapter]

    return read


def _peft_pairs(model: nn.Module) -> list[LoRAPair]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but pairing must not crash without it
        return []
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        ParamWrapper = ()  # type: ignore[assignment]

    pairs = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = set(getattr(module, "active_adapters", []) or [])
        for a_attr, b_attr, is_embedding in (
            ("lora_A", "lora_B", False),
            ("lora_embedding_A", "lora_embedding_B", True),
        ):
            a_store, b_store = getattr(module, a_attr, {}), getattr(module, b_attr, {})
            for adapter in list(a_store.keys()):
                if adapter not in b_store or (active and adapter not in active):
                    continue
                a = a_store[adapter] if is_embedding else a_store[adapter].weight
                b = b_store[adapter] if is_embedding else b_store[adapter].weight
                if not (a.requires_grad and b.requires_grad):
                    continue
                if isinstance(module, ParamWrapper):
                    raise LoRAPairingError(
                        f"{mod_name}: LoRA on MoE expert parameters (peft ParamWrapper) stacks "
                        "several experts in one factor and is not a single rank-r pair; it is not "
                        "supported. Exclude it with target_parameters=None."
                    )
                if is_embedding:
                    kind = "embedding"
                    a_name, b_name = f"{mod_name}.{a_attr}.{adapter}", f"{mod_name}.{b_attr}.{adapter}"
                else:
                    kind = "conv" if a.dim() > 2 else "linear"
                    a_name, b_name = (f"{mod_name}.{a_attr}.{adapter}.weight",
                                      f"{mod_name}.{b_attr}.{adapter}.weight")
                    groups = getattr(b_store[adapter], "groups", 1)
                    if groups != 1:
                        raise LoRAPairingError(
                            f"{mod_name}: grouped convolution LoRA (groups={groups}) has a block-"
                            "diagonal B and is not a single (k, r) factor; it is not supported."
                        )
                pairs.append(LoRAPair(a, b, _scaling_reader(module, adapter), name=mod_name,
                                      adapter=adapter, kind=kind, a_name=a_name, b_name=b_name))
    return pairs


def _moe_pairs(model: nn.Module) -> list[LoRAPair]:
    """Mixture-of-LoRA-experts layers (:mod:`altlora.moe`): ``lora_experts_A``/``lora_experts_B``
    hold, per adapter, E expert linears; each expert is a pair with the layer's scaling."""
    pairs = []
    for mod_name, module in model.named_modules():
        experts_A, experts_B = getattr(module, "lora_experts_A", None), getattr(module, "lora_experts_B", None)
        if not (isinstance(experts_A, nn.ModuleDict) and isinstance(experts_B, nn.ModuleDict)):
            continue
        active = set(getattr(module, "active_adapters", []) or [])
        for adapter in experts_A:
            if adapter not in experts_B or (active and adapter not in active):
                continue
            for e, (a, b) in enumerate(zip(experts_A[adapter], experts_B[adapter])):
                if not (a.weight.requires_grad and b.weight.requires_grad):
                    continue
                pairs.append(LoRAPair(a.weight, b.weight, (lambda m=module, ad=adapter: m.scaling[ad]),
                                      name=f"{mod_name}.expert{e}", adapter=adapter, kind="linear",
                                      a_name=f"{mod_name}.lora_experts_A.{adapter}.{e}.weight",
                                      b_name=f"{mod_name}.lora_experts_B.{adapter}.{e}.weight"))
    return pairs


def _child_pairs(model: nn.Module, a_attr: str, b_attr: str, types: tuple[type, ...],
                 needs: tuple[str, str], scaling: Callable[[nn.Module], float]) -> list[LoRAPair]:
    """Modules holding the factors as two child layers ``a_attr`` (A) and ``b_attr`` (B) of
    ``types``, with the attributes ``needs`` from which ``scaling(module)`` is computed."""
    pairs = []
    for mod_name, module in model.named_modules():
        a, b = getattr(module, a_attr, None), getattr(module, b_attr, None)
        if not (isinstance(a, types) and isinstance(b, types)):
            continue
        if not (a.weight.requires_grad and b.weight.requires_grad):
            continue
        if not all(hasattr(module, n) for n in needs):
            raise LoRAPairingError(
                f"{mod_name}: has {a_attr}/{b_attr} but no {needs[0]} and {needs[1]} attributes to compute "
                "the scaling; pass pairs=[(A, B, scaling)] explicitly.")
        pairs.append(LoRAPair(a.weight, b.weight, functools.partial(scaling, module), name=mod_name,
                              kind="conv" if isinstance(a, nn.Conv2d) else "linear",
                              a_name=f"{mod_name}.{a_attr}.weight", b_name=f"{mod_name}.{b_attr}.weight"))
    return pairs


def _torchtune_pairs(model: nn.Module) -> list[LoRAPair]:
    """torchtune-style layers: child linears ``lora_a``/``lora_b`` and ``rank``/``alpha`` attributes."""
    return _child_pairs(model, "lora_a", "lora_b", (nn.Linear,), ("alpha", "rank"), lambda m: m.alpha / m.rank)


def _kohya_pairs(model: nn.Module) -> list[LoRAPair]:
    """kohya-ss/sd-scripts ``LoRAModule``-style layers (diffusion LoRA trainers): child
    ``lora_down`` (A) and ``lora_up`` (B), Linear or Conv2d, with ``lora_dim`` and ``alpha``; the
    output is ``lora_up(lora_down(x)) * multiplier * alpha / lora_dim``."""
    return _child_pairs(model, "lora_down", "lora_up", (nn.Linear, nn.Conv2d), ("alpha", "lora_dim"),
                        lambda m: float(getattr(m, "multiplier", 1.0)) * float(m.alpha) / m.lora_dim)


def find_lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """Return every trainable, active LoRA pair of ``model``, found by module structure.

    Searches PEFT ``LoraLayer`` modules (``lora_A``/``lora_B`` for Linear, GPT-2 Conv1D and
    Conv targets, ``lora_embedding_A``/``lora_embedding_B`` for Embedding targets), one pair
    per active adapter whose two factors have ``requires_grad=True``, torchtune-style modules
    with ``lora_a``/``lora_b`` children, kohya-style ones with ``lora_down``/``lora_up``
    children (diffusion LoRA networks) and the experts of :mod:`altlora.moe` layers (one pair
    per expert; the router is not a factor). DoRA magnitude vectors, LoRA biases and
    ``modules_to_save`` copies are not factors and are left to the caller.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_lora_pairs expects an nn.Module, got {type(model).__name__}")
    pairs = _peft_pairs(model) + _moe_pairs(model) + _torchtune_pairs(model) + _kohya_pairs(model)
    seen: set[int] = set()
    for p in pairs:
        for t in (p.A, p.B):
            if id(t) in seen:
                raise LoRAPairingError(f"{p.name}: a factor appears in two LoRA pairs")
            seen.add(id(t))
    return pairs


def no_pairs_message(model: nn.Module | None) -> str:
    trainable = []
    if model is not None:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad and
                  any(f"{key}." in n for key in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))]
        if frozen:
            return (f"{type(model).__name__} has LoRA factors, but none is trainable ({len(frozen)} frozen, e.g. "
                    f"{frozen[0]}): unfreeze them before building the optimizer, e.g. "
                    "`for n, p in model.named_parameters(): p.requires_grad_('lora_' in n)`, or load the adapter "
                    "with PeftModel.from_pretrained(..., is_trainable=True).")
    shown = ", ".join(trainable[:6]) + (" ..." if len(trainable) > 6 else "")
    where = type(model).__name__ if model is not None else "the given parameters"
    return (
        f"No LoRA pairs found in {where}. Searched PEFT LoraLayer modules for active adapters with "
        "trainable lora_A/lora_B (Linear, Conv1D, Conv) or lora_embedding_A/lora_embedding_B "
        "(Embedding) factors, torchtune-style lora_a/lora_b and kohya-style lora_down/lora_up modules. "
        f"Trainable parameters seen: [{shown or 'none'}]. Wrap the model with "
        "peft.get_peft_model(model, LoraConfig(...)) first, or, for a non-PEFT model, pass the "
        "pairs explicitly: pairs=[(A, B, scaling), ...] with A of shape (r, d) and B of shape (k, r)."
    )


PairSpec = Union[LoRAPair, Sequence]


def as_pairs(specs: Iterable[PairSpec]) -> list[LoRAPair]:
    """Normalise explicit pairs given as ``LoRAPair`` or ``(A, B[, scaling[, name]])`` tuples."""
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, LoRAPair):
            out.append(spec)
            continue
        if not isinstance(spec, (tuple, list)) or not 2 <= len(spec) <= 4:
            raise LoRAPairingError(
                f"pairs[{i}]: expected a LoRAPair or a tuple (A, B[, scaling[, name]]), "
                f"got {type(spec).__name__}"
            )
        A, B, *rest = spec
        scaling = rest[0] if rest else 1.0
        name = rest[1] if len(rest) > 1 else f"pair{i}"
        out.append(LoRAPair(A, B, scaling, name=name, kind="explicit"))
    return out
