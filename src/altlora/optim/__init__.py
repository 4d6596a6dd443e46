"""Optimizers for LoRA factor pairs."""

from .adalora import AdaLoRAAdamW
from .altlora import AltLoRA, AltLoRAPlus, altlora_factor_update
from .loraplus import LoRAPlus
from .lorapro import LoRAPro, LoRAProSGD, lora_pro_gradients
from .lorarite import LoRARite, rite_factor_update
from .paired import PairedOptimizer
from .scaled import ScaledAdamW, ScaledGD, scaled_gradient

__all__ = ["AdaLoRAAdamW", "AltLoRA", "AltLoRAPlus", "LoRAPlus", "LoRAPro", "LoRAProSGD", "LoRARite",
           "PairedOptimizer", "ScaledAdamW", "ScaledGD", "altlora_factor_update", "lora_pro_gradients",
           "rite_factor_update", "scaled_gradient"]
