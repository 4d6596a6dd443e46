"""Benchmark: training-step time of 2-process DDP vs 1 process, LoRA-AdamW vs AltLoRA.

A training step is forward + backward + ``optimizer.step()`` + ``zero_grad()`` on the same global
batch: one process takes the whole batch, each of the two DDP ranks (gloo) half of it. For each
optimizer the *DDP ratio* is ``DDP step / single-process step``; AltLoRA adds no communication
under DDP (gradients are all-reduced by DDP before ``step()``, as for AdamW), so its ratio should
match LoRA-AdamW's. The check: ``ratio(AltLoRA) / ratio(LoRA-AdamW)`` within 5%.

Everything runs in one ``torchrun`` launch. The four combinations (2 optimizers x single / DDP)
are interleaved in short blocks of ``--steps`` steps, rotating their order every repetition, so
background load on the machine hits all of them alike. Each ratio is of pooled medians; a 95%
bootstrap interval over repetitions (resampled jointly, so the four cells stay paired) says
whether the run resolves the 5% target. ``optimizer.step()`` is also timed alone: under DDP it
is not split across ranks (every rank runs the whole step), so its share of the step is what
can move the ratios apart. Single-process blocks run on rank 0
while rank 1 waits in a barrier. Each combination has its own model and optimizer that keep
training across blocks (AltLoRA alternates A- and B-steps; ``--steps`` is even so both count
equally). A DDP step's time is the slower rank's.

Threads: one intra-op thread per DDP rank, and ``--single-threads`` (default 1) for the single
process. 1 thread everywhere is the robust choice on a small or shared CPU host: with more
OpenMP threads than free cores, threads spin-waiting for each other made a 2-thread step 3-20x
slower than a 1-thread one on the 2-core host the results were taken on (while other jobs ran).
With it, DDP also gets twice the cores of the single process, so the absolute DDP ratio flatters
DDP; the check compares the two optimizers' ratios, which that affects alike. On an idle machine,
``--single-threads 2`` compares equal core counts.

Run (from the repository root, with the venv active; the script launches torchrun itself):

  python benchmarks/distributed.py                 # 1 warm-up + 15 timed repetitions of 4 steps
  python benchmarks/distributed.py --quick         # smoke test
  python benchmarks/distributed.py --single-threads 2 --out /tmp/d.json

Writes JSON (default ``benchmarks/results/distributed.json``) and a markdown table next to it
(``.md``), and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OPTIMIZERS = {"LoRA-AdamW": "lora", "AltLoRA": "altlora"}
MODES = ("single", "ddp")
TARGET = 0.05  # |ratio(AltLoRA) / ratio(LoRA-AdamW) - 1|
WORLD = 2
LR = 1e-4
MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4)
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=15, help="timed repetitions of every block")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--steps", type=int, default=4, help="steps per block (even)")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--single-threads", type=int, default=1, help="intra-op threads of the single process")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up + 2 timed reps of 2 steps")
    p.add_argument("--out", type=str, default=str(RESULTS / "distributed.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.reps, args.warmup, args.steps = 2, 1, 2
    if args.steps < 2 or args.steps % 2 or args.reps < 2 or args.batch % WORLD:
        p.error("--steps must be even and >= 2, --reps >= 2, --batch divisible by 2")
    return args


# ---------------------------------------------------------------------------- launcher
def launch(args: argparse.Namespace) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={port}", __file__, *sys.argv[1:], "--worker"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(Path(args.out).with_suffix(".md").read_text())


# ---------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import LlamaConfig, LlamaForCausalLM

    import altlora
    from altlora import methods

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    per_rank = args.batch // WORLD

    def build():
        torch.manual_seed(0)
        return methods.get("lora").adapt(LlamaForCausalLM(LlamaConfig(**MODEL)), LORA)

    def tokens(t: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(t)
        return torch.randint(0, MODEL["vocab_size"], (args.batch, args.seq), generator=g)

    runs = {}  # (optimizer, mode) -> [model to call, optimizer, rows of the global batch, steps done]
    for label, name in OPTIMIZERS.items():
        for mode in MODES:
            if mode == "single" and rank != 0:
                continue
            model = build()
            opt = altlora.create_optimizer(model, name, lr=LR)
            rows = slice(None) if mode == "single" else slice(rank * per_rank, (rank + 1) * per_rank)
            runs[label, mode] = [model if mode == "single" else DistributedDataParallel(model), opt, rows, 0]

    def block(key) -> tuple[list[float], list[float]]:
        """``--steps`` training steps: (whole-step seconds, optimizer.step() seconds)."""
        run = runs[key]
        model, opt, rows, done = run
        total, step_only = [], []
        for t in range(done, done + args.steps):
            x = tokens(t)[rows]
            t0 = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            t1 = time.perf_counter()
            opt.step()
            step_only.append(time.perf_counter() - t1)
            opt.zero_grad()
            total.append(time.perf_counter() - t0)
        run[3] += args.steps
        return total, step_only

    combos = [(label, mode) for label in OPTIMIZERS for mode in MODES]
    times = {key: [] for key in combos}  # per timed repetition: (whole-step, step-only) seconds
    load_before = os.getloadavg()
    for rep in range(args.warmup + args.reps):
        k = rep % len(combos)
        for key in combos[k:] + combos[:k]:
            if key[1] == "single":
                measured = None
                if rank == 0:
                    torch.set_num_threads(args.single_threads)
                    measured = block(key)
                dist.barrier()
            else:
                torch.set_num_threads(1)
                slowest = torch.tensor(block(key), dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                measured = slowest.tolist()
            if rep >= args.warmup and measured is not None:
                times[key].append(measured)
    load_after = os.getloadavg()
    if rank == 0:
        report(args, times, runs, load_before, load_after, torch.__version__)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- report
def quartiles_ms(xs: list[float]) -> dict:
    q1, med, q3 = statistics.quantiles([x * 1e3 for x in xs], n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "n": len(xs)}


def ratio_of_ratios(times: dict, reps: list[int]) -> float:
    """``ratio(AltLoRA) / ratio(LoRA-AdamW)``, each ratio = pooled median DDP / single step."""
    def median(label, mode):
        return statistics.median(x for r in reps for x in times[label, mode][r][0])

    alt, base = ("AltLoRA", "LoRA-AdamW")
    return (median(alt, "ddp") / median(alt, "single")) / (median(base, "ddp") / median(base, "single"))


def report(args, times, runs, load_before, load_after, torch_version) -> None:
    per_opt = {}
    for label in OPTIMIZERS:
        entry = {}
        for mode in MODES:
            blocks = times[label, mode]
            entry[f"{mode}_step_ms"] = quartiles_ms([x for total, _ in blocks for x in total])
            entry[f"{mode}_optimizer_step_ms"] = quartiles_ms([x for _, only in blocks for x in only])
        entry["ddp_ratio"] = entry["ddp_step_ms"]["median"] / entry["single_step_ms"]["median"]
        per_opt[label] = entry
    everything = list(range(args.reps))
    point = ratio_of_ratios(times, everything)
    # 95% bootstrap interval over repetitions (resampled jointly, keeping the four cells paired)
    rng = random.Random(0)
    boot = sorted(ratio_of_ratios(times, rng.choices(everything, k=args.reps)) for _ in range(1000))
    interval = (boot[24], boot[974])
    inside = all(abs(v - 1) <= TARGET for v in interval)
    outside = all(abs(v - 1) > TARGET for v in interval) and (interval[0] - 1) * (interval[1] - 1) > 0
    model, _, _, _ = runs["AltLoRA", "single"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "benchmark": "distributed",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch_version,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "settings": {"world_size": WORLD, "backend": "gloo", "device": "cpu", "reps": args.reps,
                     "warmup_reps": args.warmup, "steps_per_block": args.steps,
                     "global_batch": args.batch, "seq_len": args.seq,
                     "threads": {"single_process": args.single_threads, "per_ddp_rank": 1},
                     "model": {"llama": MODEL, "lora": LORA, "trainable_params": trainable},
                     "lr": LR, "timing": "perf_counter around forward+backward+step+zero_grad "
                                         "(and around step() alone); DDP: slower rank per step"},
        "optimizers": per_opt,
        "check": {"altlora_ratio_over_lora_ratio": point, "bootstrap_95": interval,
                  "max_deviation": TARGET, "pass": abs(point - 1) <= TARGET,
                  "conclusive": inside or outside},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    lines = [
        f"torch {torch_version}, {os.cpu_count()} CPUs, gloo, {WORLD} DDP ranks x 1 thread vs 1 process x "
        f"{args.single_threads} thread(s); global batch {args.batch} x {args.seq} tokens; "
        f"{args.reps} x {args.steps} timed steps per cell; load average "
        f"{load_before[0]:.2f} -> {load_after[0]:.2f}",
        "",
        "| optimizer | 1 process: step ms, median (IQR) | 2-rank DDP: step ms, median (IQR) "
        "| DDP / 1 process | optimizer.step() ms, 1 process / DDP |",
        "|---|---:|---:|---:|---:|",
    ]

    def cell(q: dict) -> str:
        return f"{q['median']:.1f} ({q['q1']:.1f}-{q['q3']:.1f})"

    for label, e in per_opt.items():
        opt_ms = (e["single_optimizer_step_ms"]["median"], e["ddp_optimizer_step_ms"]["median"])
        lines.append(f"| {label} | {cell(e['single_step_ms'])} | {cell(e['ddp_step_ms'])} "
                     f"| {e['ddp_ratio']:.3f} | {opt_ms[0]:.1f} / {opt_ms[1]:.1f} |")
    verdict = "PASS" if result["check"]["pass"] else "FAIL"
    lines += ["", f"AltLoRA ratio / LoRA-AdamW ratio = {point:.3f}, 95% bootstrap interval over repetitions "
                  f"{interval[0]:.3f}-{interval[1]:.3f} (target: within {TARGET:.0%}: {verdict}"
                  f"{'' if inside or outside else '; this run cannot resolve it'})", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    arguments = parse_args()
    (worker if arguments.worker else launch)(arguments)
