"""The contract-test table: every optimizer of the registry, with the options its tests use.

Rows come from ``altlora.optim.REGISTRY``, so an optimizer is tested as soon as it is
registered. ``OPTIONS`` holds only what differs from a class's defaults (an lr on the class's
own scale for the tiny test models); ``VARIANTS`` adds option sets tested as rows of their own.
The contract tests (``test_contract.py``), the distributed worker and
``scripts/trajectory_fingerprint.py`` all read this table.
"""

from __future__ import annotations

import pytest

from altlora.optim import REGISTRY, PairedOptimizer

#: registered name -> options of its contract row. Weight-space steps (AltLoRA, ScaledGD,
#: LoRA-Pro SGD) need larger lrs than Adam's to move a tiny model measurably.
OPTIONS: dict[str, dict] = {
    "lora": dict(lr=1e-2),
    "adalora": dict(lr=1e-2),
    "altlora": dict(lr=1e-2),
    "altlora_plus": dict(lr=1e-2),
    "lora_plus": dict(lr=1e-3),
    "scaled_gd": dict(lr=5e-2),
    "scaled_adamw": dict(lr=1e-2),
    "lora_rite": dict(lr=1e-2),
    "lora_pro": dict(lr=1e-3),
    "lora_pro_sgd": dict(lr=0.5),
}
#: row label -> (registered name, options on top of OPTIONS)
VARIANTS: dict[str, tuple[str, dict]] = {
    "altlora_b_first": ("altlora", dict(mode="alternating", first="B")),
    "altlora_alternating": ("altlora", dict(mode="alternating")),  # both default to joint updates
    "altlora_plus_alternating": ("altlora_plus", dict(mode="alternating", relative_ridge=0.0)),
    "altlora_plus_switch3": ("altlora_plus", dict(mode="alternating", first="B", switch_every=3)),
    # clipped in weight space at every step: the norm sums r x r terms over shards and the head
    "altlora_clip": ("altlora", dict(lr=0.5, max_grad_norm=0.05)),
}


def _rows() -> dict[str, tuple[type, dict]]:
    rows = {name: (cls, dict(OPTIONS.get(name, {}))) for name, cls in REGISTRY.items() if name == cls.name}
    missing = sorted(set(rows) - set(OPTIONS))
    if missing:
        raise RuntimeError(f"tests/conftest.py: add the registered optimizer(s) {missing} to OPTIONS")
    for label, (name, kw) in VARIANTS.items():
        rows[label] = (REGISTRY[name], {**OPTIONS[name], **kw})
    return rows


#: row label -> (optimizer class, options)
CONTRACT: dict[str, tuple[type, dict]] = _rows()
#: the rows whose optimizer pairs LoRA factors (everything but the torch AdamW ones)
PAIRED: dict[str, tuple[type, dict]] = {k: v for k, v in CONTRACT.items() if issubclass(v[0], PairedOptimizer)}


def rows(table: dict[str, tuple[type, dict]]) -> list:
    """``pytest.mark.parametrize("cls, options", rows(PAIRED))`` arguments."""
    return [pytest.param(cls, kw, id=label) for label, (cls, kw) in table.items()]
