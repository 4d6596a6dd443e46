"""Optimizers for LoRA factor pairs, and their registry.

Every optimizer class that defines ``name`` (and ``description``, optionally ``aliases``) in a
module imported here is registered under those names: :data:`REGISTRY` is derived from the
classes, never written by hand. Adding an optimizer is a new module in this package and its
name on the import line below; the factory, the method registry (``altlora list``) and the
tests' tables all follow.
"""

from types import ModuleType

import torch

from . import adalora, altlora, lora_adamw, loraplus, lorapro, lorarite, scaled  # noqa: F401 (registered)
from .adalora import AdaLoRAAdamW
from .altlora import AltLoRA, AltLoRAPlus, altlora_factor_update
from .lora_adamw import LoRAAdamW
from .loraplus import LoRAPlus
from .lorapro import LoRAPro, LoRAProSGD, lora_pro_gradients
from .lorarite import LoRARite, rite_factor_update
from .paired import PairedOptimizer
from .scaled import ScaledAdamW, ScaledGD, scaled_gradient


def _registry() -> dict[str, type[torch.optim.Optimizer]]:
    found: dict[str, type[torch.optim.Optimizer]] = {}
    modules = [m for m in globals().values() if isinstance(m, ModuleType) and m.__name__.startswith(__name__ + ".")]
    for module in modules:
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == module.__name__ and "name" in vars(cls):
                for key in (cls.name, *getattr(cls, "aliases", ())):
                    if key in found:
                        raise RuntimeError(f"optimizer name {key!r} is registered twice ({found[key]}, {cls})")
                    found[key] = cls
    return dict(sorted(found.items()))


#: name or alias -> optimizer class
REGISTRY = _registry()

__all__ = ["REGISTRY", "AdaLoRAAdamW", "AltLoRA", "AltLoRAPlus", "LoRAAdamW", "LoRAPlus", "LoRAPro", "LoRAProSGD",
           "LoRARite", "PairedOptimizer", "ScaledAdamW", "ScaledGD", "altlora_factor_update", "lora_pro_gradients",
           "rite_factor_update", "scaled_gradient"]
