"""Benchmark: how far each method moves each layer's full weight, over training.

For LoRA, AltLoRA and AltLoRA+ on one built-in task (the settings of quality_cpu.yaml), every
``--every`` steps the distance of each adapted layer from the pretrained weight,
``||s B A||_F`` (B starts at 0), read from the run's checkpoints. It answers whether AltLoRA's
single weight-space step size, clipped globally, spreads its movement over the layers the way
Adam's per-entry steps do.

  python benchmarks/update_norms.py --task arithmetic --steps 40      # about 4 min on one core
  python benchmarks/update_norms.py --task polarity --steps 200

Writes ``update_norms_<task>.json`` (per method: lr, test score, and per layer the distance at
every checkpoint) and ``update_norms_<task>.png`` to --out-dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from altlora.checkpoint import checkpoints
from altlora.config import resolve_config
from altlora.train import train

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("quality_benchmark", HERE / "quality.py")
quality = sys.modules["quality_benchmark"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

#: method -> lr (the defaults, which the quality benchmark's grids choose at these budgets, BENCHMARKS.md §7)
METHODS = {"lora": 1e-3, "altlora": 0.3, "altlora_plus": 1e-3}


def layer_distances(trainable: dict[str, torch.Tensor], scaling: float) -> dict[str, float]:
    """``||s B A||_F`` per adapted layer, keyed by the layer's name."""
    out = {}
    for name, A in trainable.items():
        if ".lora_A." in name:
            B = trainable[name.replace(".lora_A.", ".lora_B.")]
            layer = name.split(".lora_A.")[0].removeprefix("base_model.model.")
            out[layer] = (scaling * B.double() @ A.double()).norm().item()
    return out


def run(task: str, method: str, lr: float, steps: int, every: int, root: Path, threads: int) -> dict:
    """One training run with a checkpoint every ``every`` steps; the layers' distances at each."""
    spec = quality.merge(quality.TASKS[task], quality.read_task_file(str(HERE / "quality_cpu.yaml")).get(task, {}))
    values = {**quality.COMMON, **spec["config"], "optimizer": method, "lr": lr, "max_steps": steps,
              "eval_every": steps, "save_every": every, "save_total_limit": 0, "threads": threads,
              "output_dir": str(root / f"{task}-{method}"), "overwrite": True}
    cfg = resolve_config(None, values, cli_source="update_norms")
    torch.manual_seed(cfg.seed)
    results = train(cfg, log=lambda m: None, progress_bar=False)
    scaling = cfg.lora_alpha / cfg.r
    per_step = {}
    for ckpt in checkpoints(Path(cfg.output_dir)):
        step = int(ckpt.name.split("-")[1])
        per_step[step] = layer_distances(torch.load(ckpt / "trainable.pt", weights_only=True), scaling)
    layers = sorted(next(iter(per_step.values())))
    return {"lr": lr, "score": results["after"][results["metric"]], "metric": results["metric"],
            "steps": sorted(per_step), "layers": {layer: [per_step[s][layer] for s in sorted(per_step)]
                                                  for layer in layers}}


def plot(report: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    lora = report["methods"]["lora"]["layers"]
    for method, res in report["methods"].items():
        total = [sum(res["layers"][k][i] ** 2 for k in res["layers"]) ** 0.5 for i in range(len(res["steps"]))]
        ax1.plot(res["steps"], total, marker="o", label=f"{method} (lr {res['lr']:g})")
        if method != "lora":
            names = list(res["layers"])
            ax2.plot(range(len(names)), [res["layers"][k][-1] / lora[k][-1] for k in names], marker=".", label=method)
    ax1.set_xlabel("step")
    ax1.set_ylabel("||W - W0||_F over all adapted layers")
    ax1.legend()
    ax2.axhline(1.0, color="gray", lw=0.5)
    ax2.set_yscale("log")
    ax2.set_xlabel("adapted layer (model order)")
    ax2.set_ylabel("final ||s B A|| / LoRA's")
    ax2.legend()
    fig.suptitle(report["task"])
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=list(quality.TASKS), default="arithmetic")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5, help="checkpoint interval")
    p.add_argument("--lrs", default=",".join(f"{m}={lr:g}" for m, lr in METHODS.items()),
                   help="method=lr comma list")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(HERE / "results"))
    args = p.parse_args()
    lrs = {m: float(lr) for m, lr in (item.split("=") for item in args.lrs.split(","))}
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="altlora-norms-") as root:
        report = {"task": args.task, "steps": args.steps, "every": args.every,
                  "methods": {m: run(args.task, m, lr, args.steps, args.every, Path(root), args.threads)
                              for m, lr in lrs.items()}}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"update_norms_{args.task}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / f"update_norms_{args.task}.png")
    for method, res in report["methods"].items():
        final = {k: v[-1] for k, v in res["layers"].items()}
        total = sum(x * x for x in final.values()) ** 0.5
        print(f"{method:13s} lr {res['lr']:<6g} {res['metric']} {res['score']:.3f}  ||W - W0|| {total:.4f}  "
              f"layer min/max {min(final.values()):.2e}/{max(final.values()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
