"""Optimizers for LoRA factor pairs."""

from .altlora import AltLoRA, AltLoRAPlus, altlora_factor_update
from .paired import PairedOptimizer

__all__ = ["AltLoRA", "AltLoRAPlus", "PairedOptimizer", "altlora_factor_update"]
