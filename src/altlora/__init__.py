"""altlora: LoRA optimizers that approximate the full gradient in the low-rank space.

Implements AltLoRA and AltLoRA+ (arXiv 2505.12455) as ``torch.optim.Optimizer`` subclasses
that find LoRA factor pairs by model structure, plus the baselines of the paper (LoRA+,
ScaledGD / Scaled AdamW, LoRA-RITE, LoRA-Pro) and a registry of runnable methods
(:mod:`altlora.methods`).
"""

from . import methods
from .factory import OPTIMIZERS, create_optimizer, register_optimizer
from .optim import (REGISTRY, AdaLoRAAdamW, AltLoRA, AltLoRAPlus, LoRAAdamW, LoRAPlus, LoRAPro, LoRAProSGD, LoRARite,
                    ScaledAdamW, ScaledGD, altlora_factor_update)
from .pairing import LoRAPair, LoRAPairingError, find_lora_pairs

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "AdaLoRAAdamW",
    "AltLoRA",
    "AltLoRAPlus",
    "LoRAAdamW",
    "LoRAPlus",
    "LoRAPro",
    "LoRAProSGD",
    "LoRARite",
    "ScaledAdamW",
    "ScaledGD",
    "LoRAPair",
    "LoRAPairingError",
    "OPTIMIZERS",
    "altlora_factor_update",
    "create_optimizer",
    "find_lora_pairs",
    "methods",
    "register_optimizer",
]
