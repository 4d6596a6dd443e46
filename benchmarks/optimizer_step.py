"""Benchmark: optimizer.step() time and optimizer state bytes of every optimizer vs AdamW.

Every optimizer of the method registry (AltLoRA, AltLoRA+, LoRA+, ScaledGD, Scaled AdamW,
LoRA-RITE, LoRA-Pro AdamW/SGD; ``lora``, ``pissa``, ``rslora``, ``dora``, ``lora_ga`` and
``full`` all train with AdamW) is measured in the same run, on the same LoRA parameters
(identical shapes and initial values; each optimizer steps its own copy) with the same
gradients, for two shapes at each rank of ``--ranks`` (default 8 and 64). Two extra rows make
the comparison like for like: AltLoRA/AltLoRA+ clip their full-weight step inside ``step()``
(``max_grad_norm=1`` by default), torch's AdamW does not, so ``AdamW(foreach)+clip`` adds the
``clip_grad_norm_`` a LoRA-AdamW loop runs and ``AltLoRA[no clip]`` drops AltLoRA's own:

  llama3-8b-qkvo-r<r>   128 pairs, A (r, 4096) and B (4096, r), float32
                        (32 layers x q/k/v/o, every pair 4096 -> 4096)
  smollm2-135m-r<r>     120 pairs, 30 layers x q/k/v/o of SmolLM2-135M, hidden 576:
                        q/o 576 -> 576, k/v 576 -> 192, float32

No model is built: the factors are plain nn.Parameters handed to the optimizers through the
explicit pairs API, ``pairs=[(A, B, scaling, name), ...]``. B is random and small (not the
PEFT zero init), so the r x r Grams are not trivially ridge * I. Before every step each
parameter gets a fresh random gradient (from a fixed-seed pool, shared by all optimizers).
The optimizers are stepped round-robin (step i of every optimizer, then step i+1, ...), so
background load on the machine hits all of them alike. AltLoRA / AltLoRA+ update both factors
every step by default; their ``[alternating]`` rows update A and B in turn, so the headline
median there is over all steps, and A-step and B-step medians are reported too.

State bytes = sum of numel * element_size over every tensor in optimizer.state, after the
warm-up (all state exists by then).

LoRA-Pro keeps Adam moments of the full k x d equivalent gradient (the point of the method,
and the paper's Table 3 memory cost): on the Llama-shaped configuration that is 17 GiB, so
it is skipped there (recorded in the JSON with the bytes it would need), and a separate
sweep measures its state and step time against AdamW for one layer of growing k = d.

Run (from the repository root, with the venv active):

  python benchmarks/optimizer_step.py                 # default: 5 warm-up + 40 timed steps
  python benchmarks/optimizer_step.py --quick         # smoke test, a few steps
  python benchmarks/optimizer_step.py --steps 100 --threads 1 --out /tmp/bench.json
  python benchmarks/optimizer_step.py --optimizers AdamW AltLoRA AltLoRA+   # the core three

It prints a markdown table and writes JSON (default benchmarks/results/optimizer_step.json)
with the torch version, thread count, machine info, per-config results, ratios vs AdamW and
pass/fail against the targets of issue 18 (ratios to AdamW(foreach=True) in the same run):

  alternating AltLoRA step time <= 0.8, alternating AltLoRA+ <= 1.0, their joint modes (the
  defaults) <= 1.2; AltLoRA state <= 0.55, AltLoRA+ state <= 1.05

``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine
that is busy with other work it still measures what the step costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import altlora

# -----------------------------------------------------------------------------
# command line

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=40, help="timed steps per optimizer")
parser.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer first")
parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
parser.add_argument("--quick", action="store_true", help="smoke test: 2 warm-up + 4 timed steps")
parser.add_argument("--out", type=str,
                    default=str(Path(__file__).resolve().parent / "results" / "optimizer_step.json"),
                    help="where to write the JSON results")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--optimizers", nargs="+", default=None, metavar="NAME",
                    help="subset to run (AdamW is always included as the baseline)")
parser.add_argument("--state-limit-gib", type=float, default=4.0,
                    help="skip an optimizer on a configuration when its state would exceed this")
parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="LoRA ranks of the configurations")
parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter (latency, needs a quiet machine); cpu: time.process_time, "
                         "the CPU seconds of this process, which background load barely changes "
                         "(with --threads 1 it equals the step's latency on an idle core)")
args = parser.parse_args()
if args.quick:
    args.steps, args.warmup = 4, 2
if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
if min(args.ranks) < 1:
    parser.error(f"--ranks must be LoRA ranks >= 1, got {args.ranks}")

torch.set_num_threads(args.threads)

RANK = 8      # the LoRA-Pro growth sweep
SCALING = 2.0  # lora_alpha / r = 16 / 8
LR = 1e-4
GRAD_POOL = 4  # distinct gradient sets, cycled through
CHECKS = {  # target name -> (optimizer, measured key)
    "altlora_time_ratio": ("AltLoRA[alternating]", "time_ratio_vs_adamw"),
    "altlora_plus_time_ratio": ("AltLoRA+[alternating]", "time_ratio_vs_adamw"),
    "altlora_joint_time_ratio": ("AltLoRA", "time_ratio_vs_adamw"),
    "altlora_plus_joint_time_ratio": ("AltLoRA+", "time_ratio_vs_adamw"),
    "altlora_state_ratio": ("AltLoRA", "state_ratio_vs_adamw"),
    "altlora_plus_state_ratio": ("AltLoRA+", "state_ratio_vs_adamw"),
}
TARGETS = {  # issue 18
    "altlora_time_ratio_max": 0.8,
    "altlora_plus_time_ratio_max": 1.0,
    "altlora_joint_time_ratio_max": 1.2,
    "altlora_plus_joint_time_ratio_max": 1.2,
    "altlora_state_ratio_max": 0.55,
    "altlora_plus_state_ratio_max": 1.05,
}

# -----------------------------------------------------------------------------
# the configurations: shapes x ranks, each a list of (name, d_in, d_out) per adapted linear layer

SHAPES = {
    "llama3-8b-qkvo": [
        (f"layers.{i}.{proj}", 4096, 4096)
        for i in range(32) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    ],
    "smollm2-135m": [
        (f"layers.{i}.{proj}", 576, d_out)
        for i in range(30)
        for proj, d_out in (("q_proj", 576), ("k_proj", 192), ("v_proj", 192), ("o_proj", 576))
    ],
}
CONFIGS = {f"{shape}-r{rank}": (layers, rank) for shape, layers in SHAPES.items() for rank in args.ranks}

# -----------------------------------------------------------------------------
# optimizers under test: name -> constructor(list of (A, B) parameter pairs)

def paired(cls, **hp):
    return lambda pairs: cls(pairs=[(A, B, SCALING, f"pair{i}") for i, (A, B) in enumerate(pairs)],
                             lr=LR, **hp)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW after ``clip_grad_norm_``: what a LoRA-AdamW training loop runs per step, where
    AltLoRA and AltLoRA+ clip inside ``step()``. The threshold never binds (the clip multiplies
    every gradient by exactly 1, as torch always does), so the shared gradients stay unchanged."""

    def step(self, closure=None):
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], 1e30, foreach=True)
        return super().step(closure)


BASELINE = "AdamW(foreach)"
OPTIMIZERS = {
    BASELINE: lambda pairs: torch.optim.AdamW(
        [t for ab in pairs for t in ab], lr=LR, weight_decay=0.0, foreach=True),
    "AdamW(foreach)+clip": lambda pairs: ClippedAdamW(
        [t for ab in pairs for t in ab], lr=LR, weight_decay=0.0, foreach=True),
    "AltLoRA": paired(altlora.AltLoRA),  # the defaults: joint updates (AltLoRA+: relative ridge)
    "AltLoRA+": paired(altlora.AltLoRAPlus),
    # the stacked (n, r, m) path, default on CUDA; on CPU the per-pair path above is the default
    "AltLoRA[batched]": paired(altlora.AltLoRA, batched=True),
    "AltLoRA+[batched]": paired(altlora.AltLoRAPlus, batched=True),
    # without the weight-space clipping (max_grad_norm=1 by default; torch's AdamW does not clip)
    "AltLoRA[no clip]": paired(altlora.AltLoRA, max_grad_norm=0.0),
    "AltLoRA+[no clip]": paired(altlora.AltLoRAPlus, max_grad_norm=0.0),
    # Algorithms 1-2's order: one factor per step
    "AltLoRA[alternating]": paired(altlora.AltLoRA, mode="alternating"),
    "AltLoRA+[alternating]": paired(altlora.AltLoRAPlus, mode="alternating", relative_ridge=0.0),
    "LoRA+": paired(altlora.LoRAPlus),
    "ScaledGD": paired(altlora.ScaledGD),
    "ScaledAdamW": paired(altlora.ScaledAdamW),
    "LoRA-RITE": paired(altlora.LoRARite),
    "LoRA-Pro": paired(altlora.LoRAPro),
    "LoRA-Pro-SGD": paired(altlora.LoRAProSGD),
}
#: fp32 state bytes an optimizer needs per (k, d) layer, for optimizers whose state is not O((k+d) r)
FULL_SIZE_STATE = {"LoRA-Pro": lambda k, d: 2 * 4 * k * d}
#: registry methods that train with each optimizer
METHODS_OF = {
    BASELINE: ["lora", "pissa", "rslora", "dora", "lora_ga", "adalora (+ allocator)", "full"],
    "AdamW(foreach)+clip": ["lora etc. with max_grad_norm (clip_grad_norm_ in the loop)"],
    "AltLoRA": ["altlora"], "AltLoRA+": ["altlora_plus"], "LoRA+": ["lora_plus"],
    "AltLoRA[batched]": ["altlora (batched=True)"], "AltLoRA+[batched]": ["altlora_plus (batched=True)"],
    "AltLoRA[no clip]": ["altlora (max_grad_norm=0)"], "AltLoRA+[no clip]": ["altlora_plus (max_grad_norm=0)"],
    "AltLoRA[alternating]": ["altlora_alternating"], "AltLoRA+[alternating]": ["altlora_plus_alternating"],
    "ScaledGD": ["scaled_gd"], "ScaledAdamW": ["scaled_adamw"], "LoRA-RITE": ["lora_rite"],
    "LoRA-Pro": ["lora_pro"], "LoRA-Pro-SGD": ["lora_pro_sgd"],
}
if args.optimizers:
    unknown = [n for n in args.optimizers if n not in OPTIMIZERS and n != "AdamW"]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {list(OPTIMIZERS)}")
    OPTIMIZERS = {n: f for n, f in OPTIMIZERS.items() if n == BASELINE or n in args.optimizers}


def add_ratios(entries: dict) -> None:
    """Step time and state bytes of each entry relative to the AdamW entry of the same run."""
    base = entries[BASELINE]
    for entry in entries.values():
        entry["time_ratio_vs_adamw"] = entry["step"]["median_ms"] / base["step"]["median_ms"]
        entry["state_ratio_vs_adamw"] = entry["state_bytes"] / base["state_bytes"]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size()
               for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def summary(xs: list[float]) -> dict:
    """Median and interquartile range of a list of seconds, reported in milliseconds."""
    xs = sorted(x * 1e3 for x in xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median_ms": statistics.median(xs), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": xs[0], "max_ms": xs[-1], "n": len(xs)}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "machine": platform.machine()}


# -----------------------------------------------------------------------------
# run every configuration

load_before = os.getloadavg()
results = {}
clock = time.perf_counter if args.clock == "wall" else time.process_time
for cfg_name, (layers, rank) in CONFIGS.items():
    gen = torch.Generator().manual_seed(args.seed)
    # initial factors: A ~ Kaiming-uniform-ish like PEFT, B random and small (not zero)
    init = [((torch.rand(rank, d_in, generator=gen) * 2 - 1) / d_in**0.5,
             torch.randn(d_out, rank, generator=gen) * 1e-2) for _, d_in, d_out in layers]
    grad_pool = [[(torch.randn(rank, d_in, generator=gen) * 1e-3,
                   torch.randn(d_out, rank, generator=gen) * 1e-3) for _, d_in, d_out in layers]
                 for _ in range(GRAD_POOL)]
    n_params = sum(A.numel() + B.numel() for A, B in init)

    skipped = {}
    for name, need in FULL_SIZE_STATE.items():
        need = sum(need(d_out, d_in) for _, d_in, d_out in layers)
        if name in OPTIMIZERS and need > args.state_limit_gib * 2**30:
            skipped[name] = {"reason": f"state would need {need / 2**30:.1f} GiB (k x d moments) "
                                       f"> --state-limit-gib {args.state_limit_gib}",
                             "state_bytes_needed": need}
    runnable = {name: make for name, make in OPTIMIZERS.items() if name not in skipped}
    # every optimizer gets its own copy of the same initial parameters
    params = {name: [(nn.Parameter(A.clone()), nn.Parameter(B.clone())) for A, B in init]
              for name in runnable}
    opts = {name: make(params[name]) for name, make in runnable.items()}
    times = {name: [] for name in runnable}
    phases = {name: [] for name in runnable}
    faults = {name: [] for name in runnable}  # minor page faults: fresh memory touched by step()

    total = args.warmup + args.steps
    order = list(runnable)
    for step in range(total):
        grads = grad_pool[step % GRAD_POOL]
        order = order[1:] + order[:1]  # rotate who goes first
        for name in order:
            opt = opts[name]
            for (A, B), (gA, gB) in zip(params[name], grads):
                A.grad, B.grad = gA, gB  # same gradient tensors for every optimizer, no copy
            phase = opt.phase() if hasattr(opt, "phase") else "AB"
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = clock()
            opt.step()
            dt = clock() - t0
            f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            if step >= args.warmup:
                times[name].append(dt)
                phases[name].append(phase)
                faults[name].append(f1 - f0)

    cfg = {"pairs": len(layers), "rank": rank, "dtype": "float32", "trainable_params": n_params,
           "shapes": sorted({f"A{(rank, d_in)} B{(d_out, rank)}" for _, d_in, d_out in layers}),
           "optimizers": {}, "skipped": skipped}
    for name, opt in opts.items():
        entry = {"step": summary(times[name]), "state_bytes": state_bytes(opt),
                 "minor_page_faults_per_step": statistics.median(faults[name])}
        for ph in ("A", "B"):
            sel = [t for t, p in zip(times[name], phases[name]) if p == ph]
            if sel:
                entry[f"step_{ph}"] = summary(sel)
        if isinstance(opt, altlora.optim.paired.PairedOptimizer):
            entry["nonfinite_skips"] = int(sum(int(st.get("nonfinite_skips", 0))
                                               for st in opt.state.values()))
        cfg["optimizers"][name] = entry
    add_ratios(cfg["optimizers"])
    cfg["checks"] = {}
    for check, (name, key) in CHECKS.items():
        if name in cfg["optimizers"]:
            value = cfg["optimizers"][name][key]
            cfg["checks"][check] = {"value": value, "max": TARGETS[check + "_max"],
                                    "pass": value <= TARGETS[check + "_max"]}
    results[cfg_name] = cfg
    del params, opts, grad_pool, init

# -----------------------------------------------------------------------------
# LoRA-Pro's state grows with k x d (paper Table 3): one layer, k = d growing, vs AdamW

growth = []
if "LoRA-Pro" in OPTIMIZERS:
    for k in (256, 512, 1024, 2048) if args.quick else (256, 512, 1024, 2048, 4096):
        gen = torch.Generator().manual_seed(args.seed)
        A0, B0 = torch.randn(RANK, k, generator=gen) / k**0.5, torch.randn(k, RANK, generator=gen) * 1e-2
        gA, gB = torch.randn(RANK, k, generator=gen) * 1e-3, torch.randn(k, RANK, generator=gen) * 1e-3
        row = {"k": k, "d": k, "rank": RANK, "optimizers": {}}
        for name in (BASELINE, "LoRA-Pro"):
            A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
            opt = OPTIMIZERS[name]([(A, B)])
            ts = []
            for i in range(args.warmup + max(3, args.steps // 4)):
                A.grad, B.grad = gA, gB
                t0 = clock()
                opt.step()
                if i >= args.warmup:
                    ts.append(clock() - t0)
            row["optimizers"][name] = {"step": summary(ts), "state_bytes": state_bytes(opt)}
        add_ratios(row["optimizers"])
        pro = row["optimizers"]["LoRA-Pro"]
        pro["predicted_state_ratio"] = k * k / ((k + k) * RANK)  # k d / ((k + d) r)
        growth.append(row)

# -----------------------------------------------------------------------------
# report: markdown table + JSON

print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
      f"{machine_info()['cpu']} x {os.cpu_count()}, {args.warmup} warm-up + {args.steps} timed "
      f"steps, load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}\n")
print("| config | optimizer | step median ms | IQR ms | A-step / B-step median ms "
      "| vs AdamW time | state MiB | vs AdamW state | page faults/step |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for cfg_name, cfg in results.items():
    for name, e in cfg["optimizers"].items():
        ab = (f"{e['step_A']['median_ms']:.2f} / {e['step_B']['median_ms']:.2f}"
              if "step_A" in e and "step_B" in e else "-")
        print(f"| {cfg_name} | {name} | {e['step']['median_ms']:.2f} | {e['step']['iqr_ms']:.2f} "
              f"| {ab} | {e['time_ratio_vs_adamw']:.2f}x | {e['state_bytes'] / 2**20:.2f} "
              f"| {e['state_ratio_vs_adamw']:.3f}x | {e['minor_page_faults_per_step']:.0f} |")
    for name, why in cfg["skipped"].items():
        print(f"| {cfg_name} | {name} | skipped: {why['reason']} | | | | | | |")
if growth:
    print("\nLoRA-Pro state and step time vs AdamW on one k x d layer, r = %d:\n" % RANK)
    print("| k = d | LoRA-Pro state MiB | vs AdamW state | predicted k d / ((k+d) r) | vs AdamW time |")
    print("|---:|---:|---:|---:|---:|")
    for row in growth:
        p = row["optimizers"]["LoRA-Pro"]
        print(f"| {row['k']} | {p['state_bytes'] / 2**20:.2f} | {p['state_ratio_vs_adamw']:.1f}x "
              f"| {p['predicted_state_ratio']:.1f}x | {p['time_ratio_vs_adamw']:.1f}x |")
print("\n| config | check | value | target | result |")
print("|---|---|---:|---:|---|")
for cfg_name, cfg in results.items():
    for check, c in cfg["checks"].items():
        print(f"| {cfg_name} | {check} | {c['value']:.3f} | <= {c['max']} "
              f"| {'PASS' if c['pass'] else 'FAIL'} |")

report = {
    "benchmark": "optimizer_step",
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "torch": torch.__version__,
    "altlora": getattr(altlora, "__version__", None),
    "threads": torch.get_num_threads(),
    "machine": machine_info(),
    "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
    "settings": {"steps": args.steps, "warmup": args.warmup, "quick": args.quick, "seed": args.seed,
                 "ranks": args.ranks, "scaling": SCALING, "lr": LR, "grad_pool": GRAD_POOL, "clock": args.clock,
                 "timing": f"{clock.__name__} around optimizer.step(), round-robin"},
    "targets": TARGETS,
    "methods_of_optimizer": {n: METHODS_OF[n] for n in OPTIMIZERS},
    "configs": results,
    "lora_pro_state_growth": growth,
    "all_pass": all(c["pass"] for cfg in results.values() for c in cfg["checks"].values()),
}
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"\nwrote {out}")
