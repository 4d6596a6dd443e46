"""Benchmark: fine-tuning quality of every method, the paper's Tables 2, 4, 9 and 11 at CPU scale.

Tasks (a parameter: ``--tasks``, and ``--task-file`` adds or overrides tasks without code changes):

  arithmetic  SmolLM2-135M-Instruct on BIG-bench 2-digit addition/subtraction, exact match of the
              greedy answer; stands in for Table 2's MetaMathQA -> GSM8K column
  polarity    all-MiniLM-L6-v2 on Pang & Lee movie-review polarity, accuracy; stands in for
              Table 4's SST-2 column (the same Rotten Tomatoes snippets)

Every run is one call of ``altlora.train.train`` (the ``altlora train`` loop) with the paper's
LLM setting (§6.1 of the reference): LoRA r 8, alpha 16 on the attention projections, cosine
schedule with 3% warm-up, no weight decay, gradient clipping 1.0, the same step budget and batch
for every method. Protocol (E.1):

  1. a learning-rate grid per method, seed 0, chosen by the final model's validation score
     (ties: lower validation loss). AltLoRA, which has no second moment, gets a wider and higher
     grid, as in the paper: decades around 0.3 instead of half-decades around 1e-3, and two more
     values than the others when the grid has more than one;
  2. seeds 1 .. S-1 at the chosen lr (the seed-0 grid run is the first seed); the table reports
     the test score, mean +- sample std over the S seeds;
  3. ablations reuse the lr chosen for their method: A-first, B-first and joint updates (Table 9), rank 32
     (Table 2's r rows, alpha kept at 16), and the Table 11 init pairs for LoRA/AltLoRA/AltLoRA+
     (Kaiming/zero is PEFT's default, i.e. the main row);
  4. "pretrained" scores the base model without training (classification: a fresh head per seed);
     gap closed = (method - LoRA) / (full - LoRA) on the test means, for ours and the paper's.

Runs live in ``--run-root`` (default runs/quality/, gitignored), one folder per run named
``<task>/<variant>/lr<lr>-s<seed>-<hash of the resolved config>``; a folder with results.json is
skipped, so the runner can be stopped and started again (a run cut short restarts). A progress bar
counts all planned runs with an ETA. ``--stop-after MIN`` starts no new run after MIN minutes;
``--report-only`` only aggregates; ``--reuse quality.json`` counts the runs an earlier session recorded
there as finished, so the protocol can be completed over several sessions. Each training seeds torch with the run's seed first, so the fresh
classification head (created before ``train`` seeds its RNG) depends on the seed only.

  python benchmarks/quality.py                      # the full protocol (many CPU hours)
  python benchmarks/quality.py --quick              # smoke test, < 2 min, writes to a temp dir
  python benchmarks/quality.py --tasks polarity --suite main,ablations,init --steps 100
  python benchmarks/quality.py --report-only        # tables from whatever has finished

Writes ``quality.json`` (environment, protocol, every planned run with its status and scores, the
aggregate), ``quality.md`` (the tables, paper numbers beside ours) and ``quality.png`` to --out-dir.
Exits non-zero if a run failed or a reported run has a non-finite loss.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import altlora
from altlora.checkpoint import RESUME_MAY_CHANGE, atomic_write_json
from altlora.config import Config, ConfigError, read_yaml_mapping, resolve_config

RESULTS = Path(__file__).resolve().parent / "results"

# ---------------------------------------------------------------------------- protocol
#: every run, every task (the paper's math setting, §6.1)
COMMON = dict(r=8, lora_alpha=16, lora_dropout=0.0, lr_scheduler="cosine", warmup_ratio=0.03,
              weight_decay=0.0, max_grad_norm=1.0, eval_before=False, save_every=0, log_every=5,
              device="cpu", bf16="false")
#: name -> paper column, description, Config values (any key of ``altlora train``)
TASKS = {
    "arithmetic": {
        "paper": "GSM8K", "about": "SmolLM2-135M on BIG-bench 2-digit +/-, exact match",
        "config": dict(model="smollm2-135m", task="arithmetic", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                       batch_size=16, max_length=64, max_steps=150, val_size=100, test_size=300),
    },
    "polarity": {
        "paper": "SST-2", "about": "all-MiniLM-L6-v2 on Pang & Lee movie-review polarity, accuracy",
        "config": dict(model="minilm-l6", task="movie-polarity", target_modules=["query", "key", "value", "dense"],
                       batch_size=16, max_length=64, max_steps=200, val_size=200, test_size=800),
    },
}
#: --quick: tiny budgets; a task's "methods"/"suites" keys restrict what runs on it
QUICK = {"arithmetic": {"methods": ["pretrained", "lora", "altlora_plus"], "suites": ["main"],
                        "config": dict(max_steps=4, batch_size=4, val_size=8, test_size=16, max_train_examples=64)},
         "polarity": {"config": dict(max_steps=8, batch_size=8, val_size=32, test_size=64, max_train_examples=256)}}

#: main methods in the paper's row order; RUN_ORDER runs the ones the gap needs first
MAIN = ("pretrained", "full", "lora", "pissa", "rslora", "lora_plus", "dora", "scaled_adamw", "lora_rite",
        "lora_pro", "altlora", "altlora_plus", "altlora_rawclip")
RUN_ORDER = ("pretrained", "lora", "full", "altlora", "altlora_plus", "altlora_rawclip", "lora_pro", "lora_rite",
             "lora_plus", "scaled_adamw", "pissa", "rslora", "dora")
#: learning-rate grids, four values each, best guess in the middle; --lr-grid-size K takes K central values
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
GRIDS = {
    "full": (1e-5, 3e-5, 1e-4, 3e-4),
    "lora_plus": (3e-5, 1e-4, 3e-4, 1e-3),   # B gets 16 x lr
    "lora_pro": (3e-5, 1e-4, 3e-4, 1e-3),    # Adam on the full k x d gradient, like full FT
    "lora_rite": (3e-5, 1e-4, 3e-4, 1e-3),   # 1e-3 and up diverge on arithmetic
    # no second moment: its lr is a step size in weight space, clipped there (max_grad_norm)
    "altlora": (0.1, 0.3, 1.0, 3.0),
    # the clipping ablation: raw factor gradients clipped by the loop, as a Trainer does; its
    # crushed steps need lrs up to 10 (the previous benchmark's choice on polarity)
    "altlora_rawclip": (0.01, 0.1, 1.0, 10.0),
}
#: main-table rows that are a method with other settings: name -> (method, Config values)
MAIN_VARIANTS = {"altlora_rawclip": ("altlora", {"clip_in_optimizer": False})}
SUITES = ("main", "ablations", "init", "stack", "experts")
#: what a task spec (built in, or from --task-file) may hold; "base": a task whose spec it extends
SPEC_KEYS = ("base", "paper", "about", "grid_shift", "methods", "suites", "config")
#: ablation suffix -> Config values (Table 9 rows; Table 2's rank rows)
ABLATIONS = {"A-first": {"optim_args": {"mode": "alternating", "first": "A"}},
             "B-first": {"optim_args": {"mode": "alternating", "first": "B"}},
             "joint": {"optim_args": {"mode": "joint"}}, "r=32": {"r": 32}}
ABLATED = ("altlora", "altlora_plus")
#: suite "experts" (Table 10): mixture-of-LoRA-experts layers, E experts, lr of the main row
EXPERTS = (4, 8)
EXPERT_METHODS = ("lora", "lora_plus", "altlora", "altlora_plus")
TABLE10 = {1: (66.11, 72.63, 72.33, 74.49, 76.91), 4: (67.43, 71.71, 71.27, 75.01, 77.33),
           8: (67.89, 70.34, 71.44, 75.33, 76.94)}  # E -> LoRA, AdaLoRA, LoRA+, AltLoRA, AltLoRA+ (GSM8K)
#: suite "stack": AltLoRA's and AltLoRA+'s training-stack defaults, each changed on its own (lr of
#: the main row): label -> (Config values, what the shipped default is, the methods it changes)
STACK = {
    "warm-up from lr 0": ({"warmup_starts_at_zero": True}, "warm-up step t at (t+1)/(W+1) of the peak", ABLATED),
    "no clipping": ({"max_grad_norm": 0.0}, "the full-weight step clipped at 1", ABLATED),
    "joint updates": ({"optim_args": {"mode": "joint"}}, "AltLoRA: alternating", ("altlora",)),
    "alternating updates": ({"optim_args": {"mode": "alternating"}}, "AltLoRA+: joint", ("altlora_plus",)),
    "absolute ridge": ({"optim_args": {"relative_ridge": 0.0}}, "AltLoRA+: ridge relative to the Gram",
                       ("altlora_plus",)),
    "bias correction": ({"optim_args": {"bias_correction": "both"}}, "no bias correction (Algorithms 1-2)", ABLATED),
}
INITS = ("gaussian/zero", "zero/gaussian", "kaiming/zero", "zero/kaiming", "spectral/zero", "zero/spectral")
DEFAULT_INIT = "kaiming/zero"  # PEFT's default: the main row
INIT_METHODS = ("lora", "altlora", "altlora_plus")

#: the paper's numbers (reference §6.2): Table 2 (GSM8K, Llama-3.1-8B, incl. r = 32 rows),
#: Table 9 (update order), Table 11 (init), Table 4 (SST-2, T5-base)
PAPER = {
    "GSM8K": {"pretrained": 51.34, "full": 73.31, "lora": 66.11, "pissa": 67.78, "rslora": 68.12, "lora_plus": 72.33,
              "dora": 68.33, "lora_pro": 73.12, "lora_rite": 74.10, "altlora": 74.49, "altlora_plus": 76.91,
              "altlora/r=32": 73.24, "altlora_plus/r=32": 76.32,
              "altlora/A-first": 74.49, "altlora_plus/A-first": 76.91,  # Algorithms 1-2's order: the main rows
              "altlora/B-first": 76.31, "altlora_plus/B-first": 76.97, "altlora/joint": 74.21, "altlora_plus/joint": 76.56},
    "SST-2": {"full": 93.97, "lora": 93.76, "rslora": 93.96, "dora": 93.65, "lora_plus": 93.92, "pissa": 93.84,
              "lora_pro": 93.92, "altlora": 93.87, "altlora_plus": 94.03},
}
TABLE11 = {  # init -> (LoRA, AltLoRA, AltLoRA+), GSM8K
    "gaussian/zero": (66.37, 73.13, 76.87), "zero/gaussian": (66.18, 72.13, 76.50),
    "kaiming/zero": (65.11, 74.49, 76.91), "zero/kaiming": (67.10, 74.03, 76.88),
    "spectral/zero": (67.63, 74.67, 76.60), "zero/spectral": (67.10, 74.61, 76.37),
}
PAPER["GSM8K"].update({f"{m}/init={i}": row[k] for i, row in TABLE11.items() for k, m in enumerate(INIT_METHODS)})


def merge(task: dict, update: dict) -> dict:
    """A task spec with ``update``'s keys, its ``config`` merged key by key."""
    return {**task, **update, "config": {**task.get("config", {}), **update.get("config", {})}}


def read_task_file(path: str) -> dict:
    """The ``--task-file`` mapping ``task name -> spec``; ConfigError naming the file and the fix.

    Config keys and values are checked later, by ``resolve_config``, for every task."""
    p = Path(path)
    data = read_yaml_mapping(p, "--task-file", "task names to specs")
    for name, spec in data.items():
        where = f"{p}: task {name!r}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping with keys from {', '.join(SPEC_KEYS)}")
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(SPEC_KEYS)}")
        if not isinstance(spec.get("config", {}), dict):
            raise ConfigError(f"{where}: 'config' must be a mapping of `altlora train` keys")
        for key, valid in (("methods", MAIN), ("suites", SUITES)):
            bad = [x for x in spec.get(key, []) if x not in valid]
            if bad:
                raise ConfigError(f"{where}: unknown {key} {bad}; valid: {', '.join(valid)}")
    return data


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default=",".join(SUITES), help=f"comma list of {', '.join(SUITES)}")
    p.add_argument("--tasks", default=None, help=f"comma list (default: all of {', '.join(TASKS)} and --task-file's)")
    p.add_argument("--task-file", default=None,
                   help="YAML mapping name -> {paper: GSM8K|SST-2|none, about: text, grid_shift: int, methods: "
                        "[main methods], suites: [...], config: {altlora train keys}}; adds tasks, or is merged "
                        "into the built-in task of that name")
    p.add_argument("--methods", default=",".join(MAIN), help="main methods to run (comma list)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per reported result")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps for every task (0: each task's own)")
    p.add_argument("--lr-grid-size", type=int, default=4, help="learning rates per method grid (1-4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--run-root", default=None, help="run folders (default runs/quality; --quick: OUT_DIR/runs)")
    p.add_argument("--out-dir", default=None, help="where quality.json/.md/.png go (default benchmarks/results; "
                                                   "--quick: a new temporary folder)")
    p.add_argument("--stop-after", type=float, default=0, help="start no new run after this many minutes (0: never)")
    p.add_argument("--report-only", action="store_true", help="train nothing; aggregate the finished runs")
    p.add_argument("--reuse", action="append", default=[], metavar="QUALITY_JSON",
                   help="count the finished runs recorded in this quality.json (an earlier session's) as done")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny budgets, 1 seed, 1 lr, a few methods, one ablation and one init")
    args = p.parse_args()
    tasks = dict(TASKS)
    try:
        extra = read_task_file(args.task_file) if args.task_file else {}
    except ConfigError as e:
        p.error(str(e))
    for name, spec in extra.items():
        base = spec.get("base")
        if base is not None and base not in tasks:
            p.error(f"{args.task_file}: task {name!r} extends unknown task {base!r}; known: {', '.join(tasks)}")
        tasks[name] = merge(tasks.get(base or name, {}), spec)
    names = args.tasks.split(",") if args.tasks else list(tasks)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        p.error(f"unknown task(s) {unknown}; known: {', '.join(tasks)}")
    args.task_specs = {n: tasks[n] for n in names}
    args.suites = set(args.suite.split(","))
    args.main = [m for m in args.methods.split(",") if m]
    args.ablations, args.inits = list(ABLATIONS), [i for i in INITS if i != DEFAULT_INIT]
    args.ablated, args.init_methods = ABLATED, INIT_METHODS
    if args.quick:
        args.seeds, args.lr_grid_size = 1, 1
        args.main = ["pretrained", "full", "lora", "altlora", "altlora_plus"]
        args.ablations, args.inits, args.ablated, args.init_methods = ["B-first"], ["spectral/zero"], ["altlora_plus"], ["altlora_plus"]
        args.task_specs = {name: merge(spec, QUICK.get(name, {})) for name, spec in args.task_specs.items()}
        args.out_dir = args.out_dir or tempfile.mkdtemp(prefix="altlora-quality-")
    args.out_dir = Path(args.out_dir or RESULTS)
    args.run_root = Path(args.run_root or (args.out_dir / "runs" if args.quick else "runs/quality"))
    for flag, given, valid in (("--suite", sorted(args.suites), SUITES), ("--methods", args.main, MAIN)):
        bad = [x for x in given if x not in valid]
        if bad:
            p.error(f"{flag}: unknown {bad}; valid: {', '.join(valid)}")
    if not 1 <= args.lr_grid_size <= 4 or args.seeds < 1:
        p.error("--lr-grid-size must be 1-4 and --seeds at least 1")
    for task in args.task_specs:  # a bad config key or value fails here, not in every run
        try:
            run_config(args, Variant(task, "lora", "lora", "main"), 1e-3, 0)
        except ConfigError as e:
            p.error(str(e))
    return args


# ---------------------------------------------------------------------------- the plan
@dataclass
class Variant:
    """One table row: a method, possibly with ablation settings, on one task."""

    task: str
    name: str                                    # "lora", "altlora/B-first", "lora/init=spectral/zero"
    method: str                                  # registry name, or "pretrained"
    suite: str
    settings: dict = field(default_factory=dict)  # Config values on top of the task's
    lr_from: str | None = None                   # reuse this variant's chosen lr (no grid)


def grid(method: str, size: int, shift: int = 0) -> list[float]:
    """``size`` central values of the method's (or main variant's) grid, moved ``shift`` places
    up (a task's ``grid_shift``)."""
    values = GRIDS.get(method, ADAM_GRID)
    size = min(size, len(values))
    start = min(max((len(values) - size + 1) // 2 + shift, 0), len(values) - size)
    return list(values[start:start + size])


def build_plan(args) -> list[Variant]:
    plan = []
    for task, spec in args.task_specs.items():
        suites, methods = args.suites & set(spec.get("suites", args.suites)), spec.get("methods", args.main)
        if "main" in suites:
            plan += [Variant(task, m, MAIN_VARIANTS.get(m, (m,))[0], "main", dict(MAIN_VARIANTS.get(m, (m, {}))[1]))
                     for m in RUN_ORDER if m in methods]
        if "ablations" in suites:
            plan += [Variant(task, f"{m}/{a}", m, "ablations", ABLATIONS[a], lr_from=m)
                     for m in args.ablated for a in args.ablations]
        if "init" in suites:
            plan += [Variant(task, f"{m}/init={i}", m, "init", {"lora_init": i}, lr_from=m)
                     for m in args.init_methods for i in args.inits]
        if "experts" in suites:
            plan += [Variant(task, f"{m}/experts={e}", m, "experts", {"experts": e}, lr_from=m)
                     for m in EXPERT_METHODS for e in EXPERTS]
        if "stack" in suites:
            plan += [Variant(task, f"{m}/{label}", m, "stack", settings, lr_from=m)
                     for label, (settings, _, changed) in STACK.items() for m in args.ablated if m in changed]
    return plan


def run_config(args, v: Variant, lr: float, seed: int) -> Config:
    """The resolved ``altlora train`` configuration of one run, with its folder."""
    spec = args.task_specs[v.task]
    values = {**COMMON, **spec["config"], **v.settings, "threads": args.threads, "seed": seed, "lr": lr,
              "optimizer": "lora" if v.method == "pretrained" else v.method}
    values["optim_args"] = dict(v.settings.get("optim_args", {}))
    if args.steps:
        values["max_steps"] = args.steps
    values["eval_every"] = values["max_steps"]  # the final model's validation score, nothing earlier
    cfg = resolve_config(None, {**values, "output_dir": "-"}, cli_source=f"quality task {v.task!r}")
    key = {k: val for k, val in cfg.fields().items() if k not in RESUME_MAY_CHANGE | {"output_dir"}}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    cfg.output_dir = str(args.run_root / v.task / v.name.replace("/", "_") / f"lr{lr:g}-s{seed}-{digest}")
    return cfg


def parent(v: Variant) -> Variant:
    """The main variant whose grid chooses ``v``'s lr."""
    return Variant(v.task, v.lr_from, v.lr_from, "main") if v.lr_from else v


def task_grid(args, v: Variant) -> list[float]:
    return grid(v.name if v.name in GRIDS else v.method, args.lr_grid_size,
                args.task_specs[v.task].get("grid_shift", 0))


def task_kind(args, task: str) -> str:
    from altlora.data import load_task_for

    return load_task_for(run_config(args, Variant(task, "lora", "lora", "main"), 1e-3, 0)).kind


# ---------------------------------------------------------------------------- running
#: finished runs of earlier sessions (``--reuse``), keyed by task/variant/run folder name
REUSED: dict[str, dict] = {}


def run_key(folder: str | Path) -> str:
    """task/variant/lr<lr>-s<seed>: a run folder's name without its config hash, so runs recorded
    before new settings (with defaults) were added to the config are still found."""
    task, variant, name = Path(folder).parts[-3:]
    return f"{task}/{variant}/{name.rsplit('-', 1)[0]}"


def reuse(path: str) -> int:
    """Take the finished runs recorded in a quality.json as finished here; returns their count."""
    runs = [r for r in json.loads(Path(path).read_text())["runs"] if r["status"] == "done"]
    REUSED.update({run_key(r["folder"]): r for r in runs})
    return len(runs)


def read_run(cfg: Config, lr: float) -> dict | None:
    """Scores of a finished run at grid value ``lr`` (None if it has no results.json and was not
    reused). ``lr`` is the grid's value, not ``cfg.lr``: the pretrained rows ask for 0, which the
    config resolves to the method's default."""
    out = Path(cfg.output_dir)
    if not (out / "results.json").is_file():
        old = REUSED.get(run_key(out))
        return None if old is None else {k: old[k] for k in ("seed", "metric", "val", "val_loss", "test",
                                                              "finite", "train_time_s")} | {"folder": str(out), "lr": lr}
    res = json.loads((out / "results.json").read_text())
    metric = res["metric"]
    if "val" in res:  # pretrained: written by evaluate_pretrained
        final, losses = {f"val_{metric}": res["val"][metric], "val_loss": float("nan")}, []
    else:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        final = [r for r in rows if f"val_{metric}" in r][-1]
        losses = [r[k] for r in rows for k in ("loss", "val_loss") if k in r]
    return {"folder": str(out), "lr": lr, "seed": cfg.seed, "metric": metric,
            "val": final[f"val_{metric}"], "val_loss": final["val_loss"], "test": res["after"][metric],
            "finite": all(math.isfinite(x) for x in losses), "train_time_s": res.get("train_time_s", 0.0)}


def evaluate_pretrained(cfg: Config) -> None:
    """Score the base model (fresh head for classification) on validation and test."""
    from altlora.data import load_task_for
    from altlora.evaluate import evaluate_task
    from altlora.models import load_model, resolve_model

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    task = load_task_for(cfg)
    model, tok = load_model(resolve_model(cfg.model), task.kind, task.labels)
    metric = "exact_match" if task.kind == "generation" else "accuracy"
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {
        "task": task.name, "model": cfg.model, "method": "pretrained", "metric": metric,
        "val": evaluate_task(model, tok, task, task.val, cfg), "after": evaluate_task(model, tok, task, task.test, cfg)})


class Runner:
    """Walks the plan: grids first, then seeds at the chosen lr; trains what is missing."""

    def __init__(self, args, train: bool, log):
        self.args, self.train, self.log = args, train, log
        self.start = time.monotonic()
        self.kinds: dict[str, str] = {}
        self.runs: list[dict] = []      # every planned run: variant, lr, seed, status, scores
        self.bar = None

    def out_of_time(self) -> bool:
        return bool(self.args.stop_after) and time.monotonic() - self.start > 60 * self.args.stop_after

    def run(self, v: Variant, lr: float, seed: int, stage: str) -> dict | None:
        cfg = run_config(self.args, v, lr, seed)
        rec = read_run(cfg, lr)
        if rec is None and self.train and not self.out_of_time():
            cfg.overwrite = True  # a run cut short restarts from scratch
            torch.manual_seed(seed)
            t0 = time.monotonic()
            try:
                if v.method == "pretrained":
                    evaluate_pretrained(cfg)
                else:
                    from altlora.train import train
                    train(cfg, log=lambda m: self.log(f"[{v.task} {v.name} lr {lr:g} seed {seed}] {m}"),
                          progress_bar=False)
            except Exception:  # noqa: BLE001 - one failed run must not stop the others
                Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
                (Path(cfg.output_dir) / "error.txt").write_text(traceback.format_exc())
                self.log(f"FAILED {cfg.output_dir}:\n{traceback.format_exc()}")
            gc.collect()
            rec = read_run(cfg, lr)
            self.log(f"{v.task} {v.name} lr {lr:g} seed {seed}: {rec and rec['test']} "
                     f"({time.monotonic() - t0:.0f} s)")
            if self.bar:
                self.bar.update(1)
        status = "done" if rec else "failed" if (Path(cfg.output_dir) / "error.txt").is_file() else "pending"
        self.runs.append({"task": v.task, "variant": v.name, "stage": stage, "lr": lr, "seed": seed,
                          "folder": cfg.output_dir, "status": status, **(rec or {})})
        return rec

    def choose(self, v: Variant) -> float | None:
        """The grid lr with the best final validation score (ties: lower validation loss)."""
        recs = [read_run(run_config(self.args, v, lr, 0), lr) for lr in task_grid(self.args, v)]
        ok = [r for r in recs if r and r["finite"]]
        if not ok or any(r is None for r in recs):
            return None
        return max(ok, key=lambda r: (r["val"], -r["val_loss"] if math.isfinite(r["val_loss"]) else 0))["lr"]

    def seeds(self, v: Variant) -> range:
        deterministic = v.method == "pretrained" and self.kind(v.task) == "generation"
        return range(1 if deterministic else self.args.seeds)

    def kind(self, task: str) -> str:
        if task not in self.kinds:
            self.kinds[task] = task_kind(self.args, task)
        return self.kinds[task]

    def variant(self, v: Variant) -> float | None:
        if v.method == "pretrained":
            lr = 0.0
        elif v.lr_from:
            lr = self.choose(parent(v))
        else:
            for lr in task_grid(self.args, v):
                self.run(v, lr, 0, "grid")
            lr = self.choose(v)
        if lr is not None:
            for seed in self.seeds(v):
                if v.lr_from or seed or v.method == "pretrained":  # seed 0 of a grid method is its grid run
                    self.run(v, lr, seed, "seed")
        return lr

    def planned(self, v: Variant) -> int:
        if v.lr_from or v.method == "pretrained":
            return len(self.seeds(v))
        return len(task_grid(self.args, v)) + self.args.seeds - 1


# ---------------------------------------------------------------------------- aggregate
def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def gap(x: float | None, lora: float | None, full: float | None, noise: float = 0.0) -> float | None:
    """(x - LoRA) / (full - LoRA); None unless full fine-tuning beat LoRA by more than ``noise``."""
    if None in (x, lora, full) or full - lora <= noise:
        return None
    return (x - lora) / (full - lora)


def aggregate(args, plan: list[Variant], runner: Runner) -> dict:
    out: dict = {}
    for v in plan:
        rows = [r for r in runner.runs if r["task"] == v.task and r["variant"] == v.name]
        lr = 0.0 if v.method == "pretrained" else runner.choose(parent(v))
        chosen = [r for r in rows if r["status"] == "done" and r["lr"] == lr and (r["stage"] == "seed" or r["seed"] == 0)]
        chosen = sorted({r["seed"]: r for r in chosen}.values(), key=lambda r: r["seed"])
        tests = [100 * r["test"] for r in chosen if r["finite"]]
        m, s = mean_std(tests)
        out.setdefault(v.task, {})[v.name] = {
            "method": v.method, "suite": v.suite, "settings": v.settings, "lr": lr, "lr_from": v.lr_from,
            "grid": {f"{r['lr']:g}": {"val": r.get("val"), "val_loss": r.get("val_loss"), "finite": r.get("finite")}
                     for r in rows if r["stage"] == "grid"},
            "test_by_seed": {r["seed"]: 100 * r["test"] for r in chosen}, "mean": m, "std": s, "n": len(tests),
            "val_loss": mean_std([r["val_loss"] for r in chosen if r["finite"] and math.isfinite(r["val_loss"])])[0],
            "seeds_planned": len(runner.seeds(v)),
            "nonfinite_seeds": [r["seed"] for r in chosen if not r["finite"]],
            "train_time_s": statistics.fmean(r["train_time_s"] for r in chosen) if chosen else None,
            "pending_runs": runner.planned(v) - sum(r["status"] == "done" for r in rows)}
    for task, rows in out.items():
        paper = PAPER.get(args.task_specs[task].get("paper"), {})
        lora, full = (rows.get(k, {}) for k in ("lora", "full"))
        # the gap is only defined when full beats LoRA by more than the standard error of the difference
        noise = math.sqrt(sum(r["std"] ** 2 / r["n"] for r in (lora, full) if r.get("n"))) if lora and full else 0.0
        for name, row in rows.items():
            row["gap_closed"] = gap(row["mean"], lora.get("mean"), full.get("mean"), noise)
            row["paper"] = paper.get(name)
            row["paper_gap_closed"] = gap(paper.get(name), paper.get("lora"), paper.get("full"))
    return out


def environment() -> dict:
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "altlora": getattr(altlora, "__version__", None),
            "threads_per_run": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_1_5_15min": os.getloadavg(), "argv": sys.argv}


def protocol(args) -> dict:
    tasks = {}
    for task, spec in args.task_specs.items():
        cfg = run_config(args, Variant(task, "lora", "lora", "main"), 1e-3, 0)
        from altlora.data import load_task_for
        data = load_task_for(cfg)
        tasks[task] = {"about": spec.get("about"), "paper_column": spec.get("paper"),
                       "methods": spec.get("methods", args.main), "suites": spec.get("suites", sorted(args.suites)),
                       "split_sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                       "grids": {m: task_grid(args, Variant(task, m, m, "main")) for m in args.main if m != "pretrained"},
                       "config": {k: v for k, v in cfg.fields().items() if k not in ("output_dir", "overwrite", "lr",
                                                                                      "seed", "optimizer", "resume")}}
    return {"tasks": tasks, "seeds": args.seeds, "lr_grid_size": args.lr_grid_size, "suites": sorted(args.suites),
            "main_methods": args.main, "ablations": args.ablations, "inits": args.inits,
            "quick": args.quick, "selection": "final validation score of seed 0, "
            "ties: lower validation loss; ablations and inits reuse their method's lr"}


# ---------------------------------------------------------------------------- report
def pm(row: dict | None) -> str:
    if not row or row["mean"] is None:
        return "not run"
    return f"{row['mean']:.2f} ± {row['std']:.2f}" + (f" (n={row['n']})" if row["n"] < row["seeds_planned"] else "")


def num(x: float | None, f: str = "{:.2f}") -> str:
    return "-" if x is None else f.format(x)


def markdown(args, report: dict) -> str:
    env, proto, agg = report["environment"], report["protocol"], report["results"]
    lines = ["# Fine-tuning quality: the paper's Tables 2/4/9/11 at CPU scale", "",
             f"`{' '.join(['python', 'benchmarks/quality.py', *sys.argv[1:]])}` · torch {env['torch']}, "
             f"{env['threads_per_run']} thread(s) per run, {env['cpu_count']} CPUs, {env['created']}; "
             f"{proto['seeds']} seed(s), lr grid of {proto['lr_grid_size']} per method (AltLoRA: its grid below) chosen on validation "
             "(seed 0), test score mean ± sample std over seeds. Gap closed = (method − LoRA) / (full − LoRA), "
             "given only where full beats LoRA by more than the standard error of that difference.", ""]
    for task, t in proto["tasks"].items():
        c, sizes = t["config"], t["split_sizes"]
        lines.append(f"* **{task}**: {t['about']}; {c['max_steps']} steps × batch {c['batch_size']} (max "
                     f"{c['max_length']} tokens), LoRA r {c['r']} α {c['lora_alpha']:g} on "
                     f"{','.join(c['target_modules'])}, {c['lr_scheduler']} with {c['warmup_ratio']:.0%} warm-up, "
                     f"clip {c['max_grad_norm']:g}; split {sizes['train']} train / {sizes['val']} val / {sizes['test']} test; "
                     "lr grids: " + "; ".join(f"{m} {', '.join(f'{x:g}' for x in g)}" for m, g in t["grids"].items())
                     + ".")
    for task, rows in agg.items():
        col = args.task_specs[task].get("paper") or "-"
        main = [m for m in MAIN if m in rows]
        if main:
            lines += ["", f"## {task}: main methods (paper: {'Table 2, Llama-3.1-8B' if col == 'GSM8K' else 'Table 4, T5-base'} {col})", "",
                      f"| Method | lr | ours (%) | val. loss | gap closed | paper {col} | paper gap closed | train s/run |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for m in main:
                r = rows[m]
                lines.append(f"| {m} | {num(r['lr'] or None, '{:g}')} | {pm(r)} | {num(r['val_loss'], '{:.3f}')} | "
                             f"{num(r['gap_closed'])} | "
                             f"{num(r['paper'])} | {num(r['paper_gap_closed'])} | {num(r['train_time_s'] or None, '{:.0f}')} |")
            width = max(len(rows[m]["grid"]) for m in main)
            lines += ["", "Validation score (%) of seed 0 over each grid (* chosen):", "",
                      "| Method | " + " | ".join(f"lr {i + 1}" for i in range(width)) + " |",
                      "|---|" + "---:|" * width]
            for m in main:
                g = rows[m]["grid"]
                if g:
                    cells = [f"{lr}: {num(100 * x['val'] if x['val'] is not None else None, '{:.1f}')}"
                             + ("*" if float(lr) == rows[m]["lr"] else "") + (" (non-finite)" if x["finite"] is False else "")
                             for lr, x in g.items()]
                    lines.append(f"| {m} | " + " | ".join(cells + [""] * (width - len(cells))) + " |")
        extra = [r for r in rows.values() if r["suite"] != "main"]
        if extra and not any(r["n"] for r in extra):
            lines += ["", f"Ablations and Table 11 inits on {task}: planned, not run in this budget."]
            continue
        if any(r["suite"] == "ablations" for r in extra):
            lines += ["", f"## {task}: update order and rank (Tables 9 and 2; paper: GSM8K, Llama-3.1-8B)", "",
                      "| Strategy | AltLoRA | paper | AltLoRA+ | paper |", "|---|---:|---:|---:|---:|"]
            for label, suffix in (("Alternating (A first)", "/A-first"), ("Alternating (B first)", "/B-first"),
                                  ("Joint update", "/joint"), ("r = 32", "/r=32")):
                cells = [f"{pm(rows.get(m + suffix))} | {num(PAPER['GSM8K'].get(m + suffix))}" for m in ABLATED]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if any(r["suite"] == "stack" for r in extra):
            lines += ["", f"## {task}: training-stack defaults, each changed on its own (lr of the main row)", "",
                      "| Variant | shipped default | AltLoRA | val. loss | AltLoRA+ | val. loss |",
                      "|---|---|---:|---:|---:|---:|",
                      "| as shipped | | " + " | ".join(f"{pm(rows.get(m))} | {num(rows.get(m, {}).get('val_loss'), '{:.3f}')}"
                                                      for m in ABLATED) + " |"]
            for label, (_, default, _) in STACK.items():
                cells = [f"{pm(rows.get(f'{m}/{label}'))} | {num(rows.get(f'{m}/{label}', {}).get('val_loss'), '{:.3f}')}"
                         for m in ABLATED]
                lines.append(f"| {label} | {default} | " + " | ".join(cells) + " |")
        if any(r["suite"] == "experts" for r in extra):
            lines += ["", f"## {task}: LoRA experts per layer (Table 10; paper: GSM8K, Llama-3.1-8B; lr of the "
                          "main row)", "",
                      "| Experts | LoRA | paper | LoRA+ | paper | AltLoRA | paper | AltLoRA+ | paper | AdaLoRA (paper) |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for e in (1, *EXPERTS):
                lora, ada, plus, alt, alt_plus = TABLE10[e]
                cells = [f"{pm(rows.get(m if e == 1 else f'{m}/experts={e}'))} | {num(paper)}"
                         for m, paper in zip(EXPERT_METHODS, (lora, plus, alt, alt_plus))]
                lines.append(f"| {e} | " + " | ".join(cells) + f" | {num(ada)} |")
        if any(r["suite"] == "init" for r in extra):
            lines += ["", f"## {task}: initialisation (Table 11; paper: GSM8K, Llama-3.1-8B)", "",
                      "| A init | B init | LoRA | paper | AltLoRA | paper | AltLoRA+ | paper |",
                      "|---|---|---:|---:|---:|---:|---:|---:|"]
            for init in INITS:
                names = [m if init == DEFAULT_INIT else f"{m}/init={init}" for m in INIT_METHODS]
                cells = [f"{pm(rows.get(n))} | {num(PAPER['GSM8K'].get(f'{m}/init={init}'))}"
                         for n, m in zip(names, INIT_METHODS)]
                lines.append(f"| {' | '.join(init.split('/'))} | " + " | ".join(cells) + " |")
            lines.append("\nKaiming/zero is PEFT's default init: our row repeats the main rows.")
    pending = []
    for task, rows in agg.items():
        todo = [n for n, r in rows.items() if r["pending_runs"] and r["suite"] == "main"]
        for suite in ("ablations", "init", "stack", "experts"):
            variants = [r for r in rows.values() if r["suite"] == suite]
            if any(r["pending_runs"] for r in variants):
                todo.append(f"{suite} ({sum(not r['pending_runs'] for r in variants)}/{len(variants)} variants complete)")
        if todo:
            pending.append(f"{task}: {', '.join(todo)}")
    if pending:
        lines += ["", "Not finished (runs pending): " + "; ".join(pending) + "."]
    if report["failed"]:
        lines += ["", "Failed runs (error.txt in each folder): " + ", ".join(report["failed"])]
    return "\n".join(lines) + "\n"


def plot(agg: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(agg), figsize=(6 * len(agg), 4.5), squeeze=False)
    for ax, (task, rows) in zip(axes[0], agg.items()):
        names = [m for m in MAIN if m in rows and rows[m]["mean"] is not None]
        ax.barh(names, [rows[m]["mean"] for m in names], xerr=[rows[m]["std"] for m in names],
                color=["tab:red" if m.startswith("altlora") else "tab:gray" for m in names])
        lo = min((rows[m]["mean"] - rows[m]["std"] for m in names), default=0)
        ax.set_xlim(max(0, lo - 5), None)
        ax.invert_yaxis()
        ax.set_title(task)
        ax.set_xlabel("test score, % (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def main() -> int:
    args = parse_args()
    args.run_root.mkdir(parents=True, exist_ok=True)
    log_file = open(args.run_root / "runner.log", "a")

    def log(message: str) -> None:
        log_file.write(f"{datetime.datetime.now():%H:%M:%S} {message}\n")
        log_file.flush()

    torch.set_num_threads(args.threads)
    for path in args.reuse:
        log(f"reused {reuse(path)} finished runs from {path}")
    plan = build_plan(args)
    dry = Runner(args, train=False, log=log)  # count what is already finished
    for v in plan:
        dry.variant(v)
    total = sum(dry.planned(v) for v in plan)
    done = sum(r["status"] == "done" for r in dry.runs)
    runner = Runner(args, train=not args.report_only, log=log)
    log(f"start: {total} planned runs, {done} finished, {args.run_root}")
    if not args.report_only:
        from tqdm.auto import tqdm
        runner.bar = tqdm(total=total, initial=done, desc="quality runs", unit="run", dynamic_ncols=True)
    for v in plan:
        runner.variant(v)
    if runner.bar:
        runner.bar.close()
    agg = aggregate(args, plan, runner)
    failed = [r["folder"] for r in runner.runs if r["status"] == "failed"]
    nonfinite = [f"{t}/{n} seeds {r['nonfinite_seeds']}" for t, rows in agg.items() for n, r in rows.items()
                 if r["nonfinite_seeds"]]
    report = {"benchmark": "quality", "environment": environment(), "protocol": protocol(args),
              "paper": PAPER, "results": agg, "runs": runner.runs, "planned_runs": total,
              "finished_runs": sum(r["status"] == "done" for r in runner.runs),
              "failed": failed, "nonfinite_reported": nonfinite}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(args, report)
    (args.out_dir / "quality.md").write_text(md)
    plot(agg, args.out_dir / "quality.png")
    print(md)
    print(f"wrote {args.out_dir / 'quality.json'}, quality.md, quality.png; runs in {args.run_root}")
    if failed or nonfinite:
        print(f"FAILED runs (see error.txt): {failed}; non-finite loss in reported runs: {nonfinite}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
