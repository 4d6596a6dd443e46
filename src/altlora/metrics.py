"""What a run records: ``metrics.jsonl`` rows, an optional TensorBoard copy, the loss curve.

Also :func:`optimizer_log_fields`, the scalars worth logging about a pair-aware optimizer
(phase, Gram conditions, skipped steps); it works on a bare optimizer and on the wrappers
of accelerate and DeepSpeed, so a plain loop, the Trainer callback (:mod:`altlora.hf`) and
``altlora train`` log the same fields.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

__all__ = ["optimizer_log_fields", "unwrap_optimizer", "MetricsLog", "plot_loss", "peak_memory_mb"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` or DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "stats"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_log_fields(optimizer: Any, with_stats: bool = True) -> dict[str, Any]:
    """``phase`` (factor(s) the next step updates), worst Gram conditions and skipped steps.

    Optimizers without pairs (AdamW, ...) give ``{}``. ``with_stats=False`` skips the
    eigenvalue computations and returns the phase only.
    """
    opt = unwrap_optimizer(optimizer)
    out: dict[str, Any] = {}
    if hasattr(opt, "phase"):
        out["phase"] = opt.phase()
    if with_stats and hasattr(opt, "stats"):
        s = opt.stats()
        pairs = [p for g in s["groups"] for p in g["pairs"]]
        if pairs:
            out["max_cond_BtB"] = max(p["cond_BtB"] for p in pairs)
            out["max_cond_AAt"] = max(p["cond_AAt"] for p in pairs)
        out["skipped_steps"] = s["skipped_steps"]
        out.update({k: s[k] for k in ("grad_norm", "clip_coef") if k in s})
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` (and TensorBoard scalars, if asked); a no-op when
    ``enabled`` is False (every process but rank 0)."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None

    def start(self, resume_step: int, tensorboard: bool) -> None:
        """Empty the file for a new run, or drop rows past ``resume_step`` (they will be redone)."""
        if not self.enabled:
            return
        if resume_step and self.path.is_file():
            rows = [r for r in self.rows() if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: true needs the tensorboard package: "
                                  "pip install 'altlora[train]'") from None
            self.writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=resume_step or None)

    def rows(self) -> list[dict]:
        """The rows written so far; a last line cut off by a killed process is left out."""
        text = self.path.read_text()
        lines = [line for line in text.splitlines() if line.strip()]
        if lines and not text.endswith("\n"):
            lines.pop()  # the process died while writing it; the run redoes that step
        return [json.loads(line) for line in lines]

    def record(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.writer.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def plot_loss(rows: list[dict], png: Path) -> Path | None:
    """Training and validation loss against step; None (nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
