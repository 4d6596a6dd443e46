"""Benchmark: training-step time, peak memory and optimizer state of every method vs LoRA-AdamW.

The analogue of the paper's Table 3 (arXiv 2505.12455, Llama-3.1-8B: AltLoRA +1.3% memory and
+16% time over LoRA, LoRA-Pro +80% / +84%), measured here on SmolLM2-135M (offline asset
``smollm2-135m``, float32, CPU) with LoRA r = 8, alpha = 16 on q/k/v/o for every method of the
registry (``altlora.methods``, default hyperparameters) and r = 32, 128 for LoRA, AltLoRA and
AltLoRA+. Issue 18 targets, each against LoRA-AdamW at the same rank: AltLoRA and AltLoRA+
<= 1.03x step time and <= 1.01x peak live memory (issue 6 allowed AltLoRA+ 1.05x and 1.02x).

Data: BIG-bench 2-digit arithmetic (offline asset ``arithmetic``), prompt + answer + eos with
the loss on the answers, packed into fixed ``--batch`` x ``--seq`` token batches (no padding, so
every step has the same cost); all methods see the same batches in the same order.

A training step is forward + backward + ``optimizer.step()`` + ``zero_grad()`` (AdaLoRA's
optimizer calls PEFT's rank allocator inside ``step()``; its orthogonality penalty is part of
its forward). ``optimizer.step()`` is also timed alone, so a reader sees where a gap comes from.

Every (method, rank) lives in its own worker process, forked from a parent that has only loaded
the model and the batches (the weights are a file mapping shared through the page cache, so 22
workers fit in memory). The parent drives them one at a time: after ``--warmup`` untimed steps
each, ``--rounds`` rounds in which every worker runs ``--steps`` steps (even: one AltLoRA A-step
and one B-step per pair of steps), the order rotated every round so drift and background load
hit all alike. Time ratio = a worker's mean step in a round / LoRA-AdamW's (same rank, and r = 8)
in the same round; reported: median and IQR over rounds, and a 95% bootstrap interval of the
median for the target checks; also the ratio of pooled medians, and the optimizer's own
overhead, (median optimizer.step() - LoRA's) / LoRA's median step. A second LoRA r = 8 worker
(the A/A control) shows the noise floor of every ratio.

Memory, per worker: resident set size once the base weights are mapped ("loaded"); then the
kernel's high-water mark is reset (``/proc/self/clear_refs``) and the peak (``ru_maxrss``) is
read at the end, so adaptation (PiSSA's SVD, LoRA-GA's gradient estimate), optimizer state,
gradients, activations and temporaries all count; delta = peak - loaded. Two peaks: *peak RSS*
of the timing worker (glibc's default allocator, which keeps freed blocks for reuse, so its
peak depends on allocation history) and *live peak* of a separate short-lived worker
(``--memory-steps`` steps, run first, one at a time) whose allocator returns every block of
64 KiB or more to the OS at once, so its RSS follows the live memory, like a GPU's
``max_memory_allocated``. Optimizer state bytes = sum of the tensors in ``optimizer.state``
(AdaLoRA's importance averages live in the model, not counted).

Run (from the repository root, with the venv active; take the CPU lock exclusively):

  python benchmarks/efficiency.py                  # all methods, 8 rounds (~15 min at 1 thread)
  python benchmarks/efficiency.py --quick          # smoke test, < 2 minutes
  python benchmarks/efficiency.py --methods lora altlora altlora_plus --ranks 32
  python benchmarks/efficiency.py --methods lora altlora altlora_plus --ranks 128 --experts \
      --sweep-only --batch 8 --seq 256 --threads 2      # r = 128 at 2048 tokens per step

Writes ``efficiency.json`` (every number, raw per-round times, environment), ``efficiency.md``
and ``efficiency.png`` to ``--out-dir`` (default ``benchmarks/results/``), and prints the tables.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the parent tokenises, then forks

import torch

import altlora
from altlora import methods
from altlora.data import encode_generation, load_task
from altlora.models import load_model, resolve_model

MODEL = "smollm2-135m"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALPHA = 16
BASELINE = "lora"
ALL_METHODS = ["full", "lora", "lora_plus", "pissa", "rslora", "dora", "adalora", "lora_ga", "scaled_gd",
               "scaled_adamw", "lora_rite", "lora_pro", "lora_pro_sgd", "altlora", "altlora_plus"]
RANK_SWEEP = ("lora", "altlora", "altlora_plus")  # measured at --ranks too, and with --experts
QUICK_METHODS = ["lora", "altlora", "altlora_plus"]
#: target rows for memory: name -> ratio key (vs LoRA at the same rank)
MEMORY_MEASURES = {"peak RSS": "peak_ratio_same_rank", "live peak": "live_peak_ratio_same_rank"}
M_MMAP_THRESHOLD, LIVE_MMAP_THRESHOLD = -3, 64 * 1024  # glibc mallopt parameter and value
TARGETS = {"altlora": {"time": 1.03, "memory": 1.01}, "altlora_plus": {"time": 1.03, "memory": 1.01}}  # issue 18
#: the paper's Table 3 (Llama-3.1-8B): memory GB (">" = lower bound), training time in minutes
PAPER_TABLE3 = {
    ("full", None): (48.0, 263, True), ("lora", 8): (22.26, 133, False),
    ("lora_rite", 8): (25.39, 164, False), ("lora_pro", 8): (40.12, 245, False),
    ("altlora", 8): (22.56, 154, False), ("altlora", 32): (23.11, 161, False),
    ("altlora", 128): (25.11, 172, False), ("altlora_plus", 8): (23.16, 158, False),
    ("altlora_plus", 32): (24.98, 165, False), ("altlora_plus", 128): (27.76, 176, False),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"registry methods (default: all {len(ALL_METHODS)}; LoRA is always included)")
    p.add_argument("--ranks", nargs="*", type=int, default=None,
                   help=f"extra ranks for {', '.join(RANK_SWEEP)} (default: 32 128)")
    p.add_argument("--experts", nargs="*", type=int, default=None,
                   help=f"mixture-of-LoRA-experts sizes for {', '.join(RANK_SWEEP)} at r = 8 (Table 10; "
                        "default: 4 8; the worker is named e.g. 'altlora+E4')")
    p.add_argument("--sweep-only", action="store_true",
                   help="at r = 8 measure only LoRA (every ratio's baseline), not the other methods nor the "
                        "A/A control: one resident worker fewer per method, so that a rank sweep at many "
                        "tokens per step fits in memory (e.g. --ranks 128 --experts --batch 8 --seq 256)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 8; quick 3)")
    p.add_argument("--steps", type=int, default=2, help="steps per worker per round (even)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per worker first")
    p.add_argument("--memory-steps", type=int, default=4, help="steps of each live-memory worker")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 2; quick 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 64; quick 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test (< 2 minutes): LoRA, AltLoRA, "
                   "AltLoRA+ at r = 8, 3 rounds, 1 x 32 tokens")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    args.methods = args.methods or (QUICK_METHODS if args.quick else ALL_METHODS)
    for name in args.methods:
        methods.get(name)  # unknown names raise, listing the valid ones
    args.ranks = args.ranks if args.ranks is not None else ([] if args.quick else [32, 128])
    args.experts = args.experts if args.experts is not None else ([] if args.quick else [4, 8])
    args.rounds = args.rounds or (3 if args.quick else 8)
    args.batch = args.batch or (1 if args.quick else 2)
    args.seq = args.seq or (32 if args.quick else 64)
    if args.sweep_only and not (args.ranks or args.experts):
        p.error("--sweep-only measures only the workers of --ranks / --experts besides LoRA r = 8: give "
                "at least one, e.g. --ranks 128")
    if args.steps < 2 or args.steps % 2 or args.rounds < 2:
        p.error("--steps must be even and >= 2, --rounds >= 2")
    return args


def configs(args: argparse.Namespace) -> list[tuple[str, int | None, bool]]:
    """(method, rank, control) to measure; rank None for full fine-tuning. LoRA r=8 first, and
    once more as an A/A control (its ratios to LoRA show the noise floor of every measure)."""
    chosen = [BASELINE] + [m for m in args.methods if m != BASELINE]
    out = [(m, None if methods.get(m).adapter == "full" else 8, False) for m in chosen]
    out.insert(1, (BASELINE, 8, True))
    if args.sweep_only:
        out = out[:1]
    for r in args.ranks:
        out += [(m, r, False) for m in chosen if m in RANK_SWEEP]
    for e in args.experts:
        out += [(f"{m}+E{e}", 8, False) for m in chosen if m in RANK_SWEEP]
    return list(dict.fromkeys(out))


def with_experts(name: str) -> tuple[str, int]:
    """'altlora+E4' -> ('altlora', 4): a method on mixture-of-LoRA-experts layers; plain: E = 1."""
    method, _, experts = name.partition("+E")
    return method, int(experts or 1)


def label(method: str, rank: int | None, control: bool = False) -> str:
    return (method if rank is None else f"{method} r={rank}") + (" (A/A control)" if control else "")


# ---------------------------------------------------------------------------- data
def packed_batches(tok, count: int, batch: int, seq: int, seed: int) -> list[dict]:
    """``count`` batches of ``batch`` x ``seq`` tokens: arithmetic examples (prompt + answer +
    eos, labels -100 on the prompt) concatenated and cut into rows."""
    need = count * batch * seq
    ids, labels = [], []
    for prompt, answer in load_task("arithmetic", seed=seed).train:
        i, lab = encode_generation(tok, prompt, answer, seq)
        ids += i
        labels += lab
        if len(ids) >= need:
            break
    shape = (count, batch, seq)
    ids, labels = torch.tensor(ids[:need]).view(shape), torch.tensor(labels[:need]).view(shape)
    return [{"input_ids": ids[k], "labels": labels[k]} for k in range(count)]


# ---------------------------------------------------------------------------- memory
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size()
               for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


# ---------------------------------------------------------------------------- worker process
def worker(conn, method: str, rank: int | None, model, batches: list[dict], args: argparse.Namespace,
           warmup: int, live: bool) -> None:
    """Adapt the inherited model for one (method, rank) and run ``warmup`` steps, then answer the
    parent: ``("run", n)`` runs n training steps and returns their timings; ``("finish",)``
    returns the memory. ``live``: large blocks go straight back to the OS (glibc mmap threshold
    fixed at 64 KiB), so the peak RSS follows the peak of live memory rather than what the
    allocator keeps for reuse."""
    try:
        if live and ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LIVE_MMAP_THRESHOLD) != 1:
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        with torch.no_grad():  # map the base weights into this process before measuring
            for p in model.parameters():
                p.sum()
        loaded = rss_mib()
        peak_reset = reset_peak()
        method, experts = with_experts(method)
        m = methods.get(method)
        if rank is None:
            model = m.adapt(model)
        else:
            model = m.adapt(model, {"r": rank, "lora_alpha": ALPHA, "target_modules": TARGET_MODULES},
                            total_steps=args.warmup + args.rounds * args.steps, init_batches=batches[:2],
                            experts=experts)
        opt = m.create_optimizer(model)
        model.train()
        done = 0

        def run(n: int) -> list[tuple[float, float, str, int]]:
            """n steps: (whole step seconds, optimizer.step() seconds, phase, minor page faults)
            each; page faults count memory the allocator had to fetch fresh from the kernel."""
            nonlocal done
            out = []
            for _ in range(n):
                batch = batches[done % len(batches)]
                phase = opt.phase() if hasattr(opt, "phase") else "AB"
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                model(**batch).loss.backward()
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                opt.zero_grad()
                t3 = time.perf_counter()
                out.append((t3 - t0, t2 - t1, phase, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
                done += 1
            return out

        run(warmup)
        conn.send(("ready", {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                             "optimizer": type(opt).__name__}))
        while (msg := conn.recv())[0] == "run":
            conn.send(("times", run(msg[1])))
        conn.send(("memory", {"loaded_mib": loaded, "peak_mib": peak_mib(), "peak_reset": peak_reset,
                              "state_bytes": state_bytes(opt), "steps": done}))
    except Exception:  # reported to the parent, which leaves this (method, rank) out
        conn.send(("error", traceback.format_exc()))


def receive(conn) -> tuple:
    try:
        return conn.recv()
    except EOFError:
        return ("error", "worker exited without answering (killed, e.g. out of memory)")


def ask(conn, msg: tuple) -> tuple:
    conn.send(msg)
    return receive(conn)


# ---------------------------------------------------------------------------- statistics
def quartiles(xs: list[float], scale: float = 1.0) -> dict:
    q1, med, q3 = statistics.quantiles([x * scale for x in xs], n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "n": len(xs)}


def median_ci(xs: list[float], seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median."""
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(2000))
    return boot[49], boot[1949]


def summarize(times: dict, memory: dict, info: dict) -> dict:
    """Per (method, rank): step and optimizer.step() times, per-round ratios to LoRA at the same
    rank and at r = 8, peak memory, state bytes and their ratios."""
    out = {}
    for key, rounds in times.items():
        method, rank, control = key
        base_keys = {"same_rank": (BASELINE, rank if rank is not None else 8, False), "r8": (BASELINE, 8, False)}
        steps = [s for blk in rounds for s in blk]
        e = {"method": method, "rank": rank, "control": control, **info[key], **memory[key],
             "step_ms": quartiles([s[0] for s in steps], 1e3),
             "optimizer_step_ms": quartiles([s[1] for s in steps], 1e3),
             "optimizer_step_share": quartiles([s[1] / s[0] for s in steps]),
             "minor_faults_per_step": statistics.median(s[3] for s in steps),
             "steps_raw": [[round(s[0] * 1e3, 2), round(s[1] * 1e3, 2), s[2], s[3]] for s in steps]}
        for phase in ("A", "B"):
            sel = [s for s in steps if s[2] == phase]
            if len(sel) > 1:
                e[f"step_ms_{phase}"] = quartiles([s[0] for s in sel], 1e3)
        e["delta_mib"] = e["peak_mib"] - e["loaded_mib"]
        e["live_delta_mib"] = e["live_peak_mib"] - e["live_loaded_mib"]
        for tag, bk in base_keys.items():
            if bk not in times:
                continue
            per_round = [statistics.fmean(s[0] for s in a) / statistics.fmean(s[0] for s in b)
                         for a, b in zip(rounds, times[bk])]
            opt_round = [statistics.fmean(s[1] for s in a) / statistics.fmean(s[1] for s in b)
                         for a, b in zip(rounds, times[bk])]
            e[f"time_ratio_{tag}"] = {**quartiles(per_round), "ci95": median_ci(per_round), "rounds": per_round}
            e[f"optimizer_step_ratio_{tag}"] = quartiles(opt_round)
            base_steps = [s for blk in times[bk] for s in blk]
            base_ms = statistics.median(s[0] for s in base_steps) * 1e3
            e[f"time_ratio_pooled_{tag}"] = e["step_ms"]["median"] / base_ms
            # what the optimizer alone adds, as a fraction of the baseline's step
            e[f"optimizer_overhead_{tag}"] = (
                e["optimizer_step_ms"]["median"] - statistics.median(s[1] for s in base_steps) * 1e3) / base_ms
            base = memory[bk]
            for mem in ("", "live_"):
                e[f"{mem}peak_ratio_{tag}"] = e[f"{mem}peak_mib"] / base[f"{mem}peak_mib"]
                base_delta = base[f"{mem}peak_mib"] - base[f"{mem}loaded_mib"]
                e[f"{mem}delta_ratio_{tag}"] = e[f"{mem}delta_mib"] / base_delta
            e[f"state_ratio_{tag}"] = e["state_bytes"] / base["state_bytes"]
        out[label(*key)] = e
    return out


def checks(results: dict) -> list[dict]:
    rows = []
    for name, e in results.items():
        limits = TARGETS.get(e["method"])  # the control is LoRA: no target
        if not limits or "time_ratio_same_rank" not in e:
            continue
        t = e["time_ratio_same_rank"]
        lo, hi = t["ci95"]
        rows.append({"config": name, "quantity": "step time", "value": t["median"], "ci95": [lo, hi],
                     "max": limits["time"], "pass": t["median"] <= limits["time"],
                     "resolved": hi <= limits["time"] or lo > limits["time"]})
        for quantity, key in MEMORY_MEASURES.items():
            rows.append({"config": name, "quantity": quantity, "value": e[key], "max": limits["memory"],
                         "pass": e[key] <= limits["memory"]})
    return rows


# ---------------------------------------------------------------------------- report
def paper_ratios(method: str, rank: int | None) -> tuple[float, float, bool] | None:
    """The paper's (memory, time) for this row over LoRA r=8 (Table 3), and whether the memory is
    a lower bound; None where the paper has no such row."""
    row = PAPER_TABLE3.get((method, rank))
    if row is None:
        return None
    lora_mem, lora_min, _ = PAPER_TABLE3[(BASELINE, 8)]
    return row[0] / lora_mem, row[1] / lora_min, row[2]


def paper_cells(method: str, rank: int | None) -> tuple[str, str]:
    """The paper's memory and time for this row as % over LoRA, or '-'."""
    ratios = paper_ratios(method, rank)
    if ratios is None:
        return "-", "-"
    mem, minutes, lower = ratios
    return f"{'>' if lower else ''}{100 * (mem - 1):+.1f}%", f"{100 * (minutes - 1):+.1f}%"


def row_name(e: dict) -> str:
    return e["method"] + (" (A/A control)" if e["control"] else "")


def markdown(report: dict) -> str:
    env, s, res = report["environment"], report["settings"], report["results"]
    iqr = lambda q, f=".3f": f"{q['median']:{f}} ({q['q1']:{f}}-{q['q3']:{f}})"  # noqa: E731
    lines = [
        f"SmolLM2-135M (float32, CPU), LoRA alpha {ALPHA} on q/k/v/o, batch {s['batch']} x {s['seq']} "
        f"tokens (packed arithmetic); torch {env['torch']}, {env['threads']} thread(s), {env['cpu']} x "
        f"{env['cpu_count']}; {s['warmup']} warm-up steps, then {s['rounds']} rounds x {s['steps']} steps per "
        f"method, interleaved; load average {env['load_average_before'][0]:.2f} -> "
        f"{env['load_average_after'][0]:.2f}; {report['created']}",
        "",
        "**Table 3 analogue.** Ratios to LoRA-AdamW: time = median (IQR) over rounds of per-round "
        "step-time ratios; peak RSS = the timing process's peak resident memory (glibc's default "
        "allocator, which keeps freed blocks for reuse); live peak = the peak RSS of a separate "
        "process whose large blocks are returned to the OS at once (64 KiB mmap threshold), i.e. "
        "the peak of live memory. Paper: Llama-3.1-8B, % over LoRA r=8.",
        "",
        "| method | r | time vs LoRA (same r) | time vs LoRA r=8 | paper time | peak RSS vs LoRA (same r) "
        "| live peak vs LoRA (same r) | live peak vs LoRA r=8 | paper memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in res.values():
        pm, pt = paper_cells(e["method"], e["rank"])
        lines.append(f"| {row_name(e)} | {e['rank'] or '-'} | {iqr(e['time_ratio_same_rank'])} "
                     f"| {iqr(e['time_ratio_r8'])} | {pt} | {e['peak_ratio_same_rank']:.4f} "
                     f"| {e['live_peak_ratio_same_rank']:.4f} | {e['live_peak_ratio_r8']:.4f} | {pm} |")
    lines += [
        "",
        "**Where the time goes.** Step and optimizer.step() in ms, median (IQR) over all timed steps; "
        "pooled = median step / LoRA's median step (same r); share = optimizer.step() / step; opt. ratio "
        "= per-round optimizer.step() time vs LoRA's; opt. overhead = (median optimizer.step() - "
        "LoRA's) / LoRA's median step, what the optimizer alone adds; faults = minor page faults per "
        "step (memory the allocator fetched fresh from the kernel).",
        "",
        "| method | r | step ms | pooled | optimizer.step ms | share | opt. ratio | opt. overhead | faults |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in res.values():
        lines.append(
            f"| {row_name(e)} | {e['rank'] or '-'} | {iqr(e['step_ms'], '.0f')} "
            f"| {e['time_ratio_pooled_same_rank']:.3f} | {iqr(e['optimizer_step_ms'], '.1f')} "
            f"| {100 * e['optimizer_step_share']['median']:.1f}% "
            f"| {e['optimizer_step_ratio_same_rank']['median']:.2f}x "
            f"| {100 * e['optimizer_overhead_same_rank']:+.1f}% | {e['minor_faults_per_step']:.0f} |")
    lines += ["", "optimizer.step() costs the same at any batch size while forward + backward grow with "
              f"it, so every time ratio here moves towards 1 for larger batches (ours: {s['batch']} x "
              f"{s['seq']} tokens per step; the paper's setting: 32 x 1024): opt. overhead x LoRA's step "
              "ms / another step's ms rescales it."]
    lines += [
        "",
        "**Where the memory goes.** Peak and (delta = peak - RSS with the base model loaded: adapters, "
        "gradients, optimizer state, activations, temporaries) in MiB; state = tensors in "
        "optimizer.state.",
        "",
        "| method | r | peak RSS (delta) | live peak (delta) | live delta vs LoRA | state MiB | state vs LoRA "
        "| trainable |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in res.values():
        lines.append(
            f"| {row_name(e)} | {e['rank'] or '-'} | {e['peak_mib']:.0f} ({e['delta_mib']:.0f}) "
            f"| {e['live_peak_mib']:.0f} ({e['live_delta_mib']:.0f}) | {e['live_delta_ratio_same_rank']:.2f}x "
            f"| {e['state_bytes'] / 2**20:.2f} | {e['state_ratio_same_rank']:.2f}x | {e['trainable_params']:,} |")
    lines += ["", "**Targets (issue 18)**, against LoRA-AdamW at the same rank:", "",
              "| config | quantity | measured | 95% CI of median | target | result |",
              "|---|---|---:|---:|---:|---|"]
    for c in report["checks"]:
        ci = f"{c['ci95'][0]:.3f}-{c['ci95'][1]:.3f}" if "ci95" in c else "-"
        verdict = ("PASS" if c["pass"] else "FAIL") + ("" if c.get("resolved", True) else " (unresolved)")
        lines.append(f"| {c['config']} | {c['quantity']} | {c['value']:.4f}x | {ci} | <= {c['max']}x "
                     f"| {verdict} |")
    if report["failed"]:
        lines += ["", "Not measured (worker error): " + "; ".join(
            f"{k}: {v.strip().splitlines()[-1]}" for k, v in report["failed"].items())]
    q = report.get("quantized_base")
    if q:
        cells = [f"{how} {v['mib']} MiB ({v['ratio_vs_float32']:.2f}x)" if isinstance(v, dict) else f"{how}: {v}"
                 for how, v in q.items() if how != "float32_mib"]
        lines += ["", f"Base weights with `altlora train --quantize` (torchao weight-only, linear layers; the "
                      f"embeddings stay float): float32 {q['float32_mib']} MiB, " + ", ".join(cells) + "."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = list(report["results"].values())
    names = [label(e["method"], e["rank"], e["control"]) for e in res]
    y = range(len(res))
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.35 * len(res) + 2), sharey=True)
    panels = [("step time vs LoRA (same r)\nmedian, IQR over rounds", "time_ratio_same_rank"),
              ("peak memory vs LoRA (same r)\nRSS (orange), live (red)", "peak_ratio_same_rank"),
              ("optimizer state bytes vs LoRA (same r), log", "state_ratio_same_rank")]
    for ax, (title, key) in zip(axes, panels):
        if key == "time_ratio_same_rank":
            med = [e[key]["median"] for e in res]
            err = [[m - e[key]["q1"] for m, e in zip(med, res)], [e[key]["q3"] - m for m, e in zip(med, res)]]
            ax.barh(y, med, xerr=err, color="tab:blue", capsize=2)
        elif "peak" in key:
            ax.barh([i - 0.2 for i in y], [e[key] for e in res], height=0.4, color="tab:orange")
            ax.barh([i + 0.2 for i in y], [e["live_" + key] for e in res], height=0.4, color="tab:red")
        else:  # optimizers without state (ScaledGD, LoRA-Pro SGD) get no bar
            ax.barh(y, [e[key] or float("nan") for e in res], color="tab:green")
            ax.set_xscale("log")
        if key != "state_ratio_same_rank":  # the paper's Table 3 where it compares the same rows
            at = [(i, paper_ratios(e["method"], e["rank"])) for i, e in zip(y, res)
                  if e["rank"] in (8, None) and not e["control"]]
            at = [(i, p[0] if "peak" in key else p[1]) for i, p in at if p is not None]
            ax.plot([v for _, v in at], [i for i, _ in at], "kD", ms=5, label="paper (Llama-3.1-8B)")
            ax.legend(fontsize=8, loc="lower right")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title, fontsize=10)
    axes[0].set_yticks(list(y), names)
    axes[0].invert_yaxis()
    s = report["settings"]
    fig.suptitle(f"SmolLM2-135M, LoRA q/k/v/o, batch {s['batch']} x {s['seq']}, CPU "
                 f"{report['environment']['threads']} thread(s)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- quantized base
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores; for torchao's quantized tensors, their integer data and scales."""
    inner = [getattr(t, name) for name in getattr(t, "tensor_data_names", [])]
    inner += [x for name in getattr(t, "optional_tensor_data_names", []) if (x := getattr(t, name, None)) is not None]
    return sum(tensor_bytes(x) for x in inner) if inner else t.numel() * t.element_size()


def quantized_base_bytes(model: torch.nn.Module) -> dict:
    """What ``altlora train --quantize`` saves (QLoRA-style base): bytes of the base weights as
    loaded (float32) and after each torchao weight-only quantization of the linear layers;
    counted from the tensors' storage, so exact, unlike a resident-set measurement."""
    import copy

    from altlora.models import QUANTIZE, quantize_base

    full = sum(tensor_bytes(p) for p in model.parameters())
    out = {"float32_mib": round(full / 2**20, 1)}
    for how in QUANTIZE[1:]:
        try:
            q = quantize_base(copy.deepcopy(model), how)
        except Exception as e:  # noqa: BLE001 - torchao missing: say so in the report
            out[how] = f"not measured: {e}"
            continue
        size = sum(tensor_bytes(p) for p in q.parameters())
        out[how] = {"mib": round(size / 2**20, 1), "ratio_vs_float32": round(size / full, 3)}
    return out


# ---------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the parent runs no parallel work before forking; workers set --threads
    model, tok = load_model(resolve_model(MODEL), "generation")
    batches = packed_batches(tok, 8, args.batch, args.seq, args.seed)
    todo = configs(args)
    ctx = multiprocessing.get_context("fork")
    failed: dict[str, str] = {}

    def start(key, warmup: int, live: bool):
        """Fork the worker of ``key``; it adapts and warms up alone. (process, pipe) or None."""
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(theirs, *key[:2], model, batches, args, warmup, live), daemon=True)
        proc.start()
        kind, payload = receive(ours)
        print(f"{label(*key)}{' (live memory)' if live else ''}: {kind} ({time.time() - t_start:.0f} s)",
              flush=True)
        if kind == "ready":
            return proc, ours, payload
        failed[label(*key)] = payload
        proc.join()
        return None

    def finish(key, proc, conn) -> dict | None:
        kind, payload = ask(conn, ("finish",))
        proc.join()
        if kind == "memory":
            return payload
        failed[label(*key)] = payload
        return None

    load_before = os.getloadavg()
    t_start = time.time()
    # pass 1, live memory: one short-lived worker at a time, --memory-steps steps each
    live = {}
    for key in todo:
        if (w := start(key, args.memory_steps, live=True)) and (mem := finish(key, *w[:2])):
            live[key] = mem
    # pass 2, timing (and peak RSS under the default allocator): all workers alive, round-robin
    workers, info = {}, {}
    for key in todo:
        if key in live and (w := start(key, args.warmup, live=False)):
            workers[key], info[key] = w[:2], w[2]
    if (BASELINE, 8, False) not in workers:
        raise SystemExit(f"the baseline LoRA r=8 failed:\n{failed.get(label(BASELINE, 8))}")
    times = {key: [] for key in workers}
    for r in range(args.rounds):
        keys = list(workers)
        k = r % len(keys)
        for key in keys[k:] + keys[:k]:
            kind, payload = ask(workers[key][1], ("run", args.steps))
            if kind != "times":
                failed[label(*key)] = payload
                del workers[key], times[key]
                continue
            times[key].append(payload)
        print(f"round {r + 1}/{args.rounds} ({time.time() - t_start:.0f} s)", flush=True)
    memory = {}
    for key, (proc, conn) in workers.items():
        if (mem := finish(key, proc, conn)) is not None:
            memory[key] = {**mem, "live_loaded_mib": live[key]["loaded_mib"],
                           "live_peak_mib": live[key]["peak_mib"]}
        else:
            del times[key]
    load_after = os.getloadavg()

    results = summarize(times, memory, info)
    report = {
        "benchmark": "efficiency",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "altlora": altlora.__version__,
                        "python": platform.python_version(), "platform": platform.platform(),
                        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                     if ln.startswith("model name")), platform.machine()),
                        "cpu_count": os.cpu_count(), "threads": args.threads,
                        "load_average_before": load_before, "load_average_after": load_after,
                        "wall_s": round(time.time() - t_start, 1)},
        "settings": {"model": MODEL, "target_modules": TARGET_MODULES, "lora_alpha": ALPHA,
                     "batch": args.batch, "seq": args.seq, "task": "arithmetic (packed)",
                     "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                     "quick": args.quick, "hyperparameters": "registry defaults per method",
                     "timing": "perf_counter around forward+backward+step+zero_grad and around step(); "
                               "one forked process per (method, rank), round-robin, rotated order",
                     "memory": "ru_maxrss after the timed steps, high-water reset after the base "
                               "weights are mapped; state = tensors in optimizer.state"},
        "targets": TARGETS,
        "paper_table3": {label(*k): {"memory_gb": v[0], "minutes": v[1], "memory_lower_bound": v[2]}
                         for k, v in PAPER_TABLE3.items()},
        "results": results,
        "failed": failed,
    }
    report["quantized_base"] = quantized_base_bytes(model)
    report["checks"] = checks(results)
    report["all_pass"] = all(c["pass"] for c in report["checks"])
    (args.out_dir / "efficiency.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out_dir / "efficiency.md").write_text(md)
    plot(report, args.out_dir / "efficiency.png")
    print("\n" + md + f"\nwrote {args.out_dir}/efficiency.{{json,md,png}}")


if __name__ == "__main__":
    main()
