"""Baseline optimizers: LoRA+, ScaledGD / Scaled AdamW, LoRA-RITE, LoRA-Pro (SGD and AdamW).

Exactness claims are checked in float64 against PEFT where PEFT ships the method, and against
the closed forms of the papers otherwise.
"""


import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer, create_riemannian_optimizer

from altlora.optim import LoRAPlus, LoRAPro, LoRAProSGD, LoRARite, ScaledAdamW, ScaledGD
from altlora.optim.lorapro import equivalent_gradient, gram_basis, lora_pro_gradients
from lowrank_problem import DT, Problem, proj_col, proj_row, rel
from tiny_models import single_thread, tiny_llama, token_batch  # noqa: F401  (autouse fixture)

def tiny(seed=0, dtype=DT, head=True, target_modules=("q_proj", "v_proj", "down_proj"), **lora_kw):
    model = tiny_llama(seed, dtype)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules),
                      modules_to_save=["lm_head"] if head else None, **lora_kw)
    model = get_peft_model(model, lcfg)
    with torch.no_grad():  # non-zero B, so every preconditioner is exercised
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_A" in n:
                p.normal_(0, 0.05)
    return model


def train(model, opts, steps, start=0):
    opts = opts if isinstance(opts, list) else [opts]
    for t in range(start, start + steps):
        x = token_batch(t)
        model(input_ids=x, labels=x).loss.backward()
        for o in opts:
            o.step()
        model.zero_grad()


def trainables(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_trajectory(make_ours, make_ref, steps=3, atol=1e-12, **model_kw):
    m1, m2 = tiny(**model_kw), tiny(**model_kw)
    train(m1, make_ours(m1), steps)
    train(m2, make_ref(m2), steps)
    a, b = trainables(m1), trainables(m2)
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())
        moved += 1
    return moved


# ----------------------------------------------------------------------------- LoRA+
def test_loraplus_matches_peft_groups_and_updates():
    """A at lr, B and 1-D tensors (lora_B biases) at 16 lr, 2-D head at lr: PEFT's groups."""
    n = assert_same_trajectory(
        lambda m: LoRAPlus(m, lr=1e-3, ratio=16),
        lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16),
        lora_bias=True)
    assert n > 12


def test_loraplus_embedding_learning_rate_matches_peft():
    kw = dict(target_modules=["q_proj", "embed_tokens"])
    assert_same_trajectory(
        lambda m: LoRAPlus(m, lr=1e-3, lr_embedding=3e-4),
        lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                            loraplus_lr_embedding=3e-4), **kw)


def test_loraplus_ratio_is_the_b_learning_rate_ratio():
    model = tiny()
    opt = LoRAPlus(model, lr=1e-3, ratio=16)
    before = trainables(model)
    train(model, opt, 1)
    after = trainables(model)
    # First Adam step moves every entry by ~lr (|m/sqrt(v)| = 1): B by 16x A's lr.
    for k in before:
        step = (after[k] - before[k]).abs().max().item()
        want = 16e-3 if "lora_B" in k else 1e-3
        assert abs(step - want) < 1e-3 * want, (k, step)


def test_loraplus_honours_weight_decay_where_peft_drops_it():
    kw = dict(lr=1e-3, loraplus_lr_ratio=16)
    # PEFT: weight_decay=0.1 is silently overridden by loraplus_weight_decay (default 0) ...
    assert_same_trajectory(lambda m: LoRAPlus(m, lr=1e-3, weight_decay=0.0),
                           lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, weight_decay=0.1, **kw))
    # ... ours applies it, as PEFT does only through loraplus_weight_decay.
    assert_same_trajectory(lambda m: LoRAPlus(m, lr=1e-3, weight_decay=0.1),
                           lambda m: create_loraplus_optimizer(m, torch.optim.AdamW,
                                                               loraplus_weight_decay=0.1, **kw))
    with pytest.raises(AssertionError):
        assert_same_trajectory(lambda m: LoRAPlus(m, lr=1e-3, weight_decay=0.1),
                               lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, weight_decay=0.1, **kw))


# ----------------------------------------------------------------------------- Scaled GD / AdamW
def test_scaled_adamw_matches_peft_riemannian_adamw():
    assert_same_trajectory(
        lambda m: ScaledAdamW(m, lr=1e-3, ridge=1e-3, weight_decay=0.05, aux_weight_decay=0.05),
        lambda m: create_riemannian_optimizer(m, torch.optim.AdamW, lr=1e-3, reg=1e-3, weight_decay=0.05),
        atol=1e-11)


def test_scaled_gd_matches_peft_riemannian_sgd():
    assert_same_trajectory(
        lambda m: ScaledGD(m, lr=5e-2, ridge=1e-3, weight_decay=0.01),
        lambda m: create_riemannian_optimizer(m, torch.optim.SGD, lr=5e-2, reg=1e-3, weight_decay=0.01),
        steps=4, atol=1e-11, head=False)


def test_scaled_adamw_without_bias_correction_transcription():
    """correct_bias=False: p <- p - lr (m / (sqrt(v) + eps) + wd p) on g~ = (B^T B + d I)^-1 grad_A."""
    prob, s, lr, d, wd, (b1, b2), eps = Problem(), 2.0, 1e-2, 1e-4, 0.1, (0.9, 0.8), 1e-6
    A, B = prob.params(s)
    opt = ScaledAdamW(pairs=[(A, B, s)], lr=lr, ridge=d, weight_decay=wd, betas=(b1, b2), eps=eps,
                      correct_bias=False)
    a, b = A.detach().clone(), B.detach().clone()
    ma, va, mb, vb = (torch.zeros_like(t) for t in (a, a, b, b))
    I = torch.eye(3, dtype=DT)
    for _ in range(4):
        prob.backward(A, B, s)
        ga = torch.linalg.solve(b.T @ b + d * I, A.grad)
        gb = torch.linalg.solve(a @ a.T + d * I, B.grad.T).T
        ma, va = b1 * ma + (1 - b1) * ga, b2 * va + (1 - b2) * ga**2
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb**2
        a, b = a - lr * (ma / (va.sqrt() + eps) + wd * a), b - lr * (mb / (vb.sqrt() + eps) + wd * b)
        opt.step()
    assert rel(A.detach(), a) < 1e-12 and rel(B.detach(), b) < 1e-12


@pytest.mark.parametrize("cls,invariant", [(ScaledGD, True), (ScaledAdamW, False)])
def test_scaled_gd_is_transformation_invariant_with_zero_ridge(cls, invariant):
    prob, s = Problem(), 2.0
    products = []
    for transform in (False, True):
        A, B = prob.params(s, transform=transform)
        opt = cls(pairs=[(A, B, s)], lr=1e-2, ridge=0.0)
        for _ in range(5):
            prob.backward(A, B, s)
            opt.step()
        products.append((B @ A).detach())
    err = rel(products[1], products[0])
    assert (err < 1e-10) if invariant else (err > 1e-4), err  # Adam is the negative control


# ----------------------------------------------------------------------------- LoRA-Pro
def _random_pair(k=12, d=10, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d, generator=g, dtype=DT)
    B = torch.randn(k, r, generator=g, dtype=DT)
    G = torch.randn(k, d, generator=g, dtype=DT)
    return A, B, G


def tangent_projection(A, B, G):
    PB, PA = proj_col(B), proj_row(A)
    return PB @ G + G @ PA - PB @ G @ PA


@pytest.mark.parametrize("solve_x", [True, False])
def test_lora_pro_equivalent_gradient_is_the_tangent_projection(solve_x):
    A, B, G = _random_pair()
    s = 2.5
    gA, gB = s * B.T @ G, s * G @ A.T
    basis = gram_basis(A[None], B[None], 0.0)
    dA, dB, X = lora_pro_gradients(basis, A[None], B[None], gA[None], gB[None], 1 / s**2, solve_x=solve_x)
    assert rel(equivalent_gradient(A, B, dA[0], dB[0], s), tangent_projection(A, B, G)) < 1e-10
    if solve_x:  # Theorem 2.2: B^T B X + X A A^T = -(1/s^2)(B^T B)^-1 grad_A A^T
        C = -torch.linalg.solve(B.T @ B, gA) @ A.T / s**2
        X = X[0]
        assert rel(B.T @ B @ X + X @ A @ A.T, C) < 1e-8
        # and it minimises ||g_A - grad_A||^2 + ||g_B - grad_B||^2 over X
        def objective(Xp):
            return ((dA[0] - X @ A + Xp @ A - gA).norm() ** 2 + (dB[0] + B @ X - B @ Xp - gB).norm() ** 2)
        for seed in range(3):
            E = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=DT) * 1e-3
            assert objective(X + E) > objective(X)


def test_lora_pro_sgd_induced_update_is_the_projected_full_gradient():
    prob, s, lr = Problem(), 2.0, 1e-3
    A, B = prob.params(s)
    opt = LoRAProSGD(pairs=[(A, B, s)], lr=lr, ridge=0.0)
    a, b = A.detach().clone(), B.detach().clone()
    G = prob.full_grad(a, b, s)
    prob.backward(A, B, s)
    opt.step()
    gA, gB = (a - A.detach()) / lr, (b - B.detach()) / lr
    assert rel(equivalent_gradient(a, b, gA, gB, s), tangent_projection(a, b, G)) < 1e-9


def test_lora_pro_adamw_applies_the_projection_of_the_adam_direction():
    prob, s, lr = Problem(), 2.0, 1e-3
    A, B = prob.params(s)
    opt = LoRAPro(pairs=[(A, B, s)], lr=lr, ridge=0.0, eps=1e-8)
    for t in range(3):
        a, b = A.detach().clone(), B.detach().clone()
        G = prob.full_grad(a, b, s)
        prob.backward(A, B, s)
        opt.step()
        st = opt.state[A]
        bc1, bc2 = 1 - 0.9 ** (t + 1), 1 - 0.999 ** (t + 1)
        G_hat = (st["exp_avg"] / bc1) / ((st["exp_avg_sq"] / bc2).sqrt() + 1e-8)
        gA, gB = (a - A.detach()) / lr, (b - B.detach()) / lr
        assert rel(equivalent_gradient(a, b, gA, gB, s), tangent_projection(a, b, G_hat)) < 1e-8
        if t == 0:  # first moment = (1 - b1) * projected full gradient: the true step count is used
            assert rel(st["exp_avg"], 0.1 * tangent_projection(a, b, G)) < 1e-10


def test_lora_pro_state_holds_full_size_moments():
    model = tiny(dtype=torch.float32)
    opt = LoRAPro(model, lr=1e-4)
    train(model, opt, 2)
    pairs = [g for g in opt.param_groups if g["lora"]][0]["params"]
    expected = 0
    for A, B in zip(pairs[0::2], pairs[1::2]):
        k, d = B.shape[0], A.shape[1]
        assert opt.state[A]["exp_avg"].shape == (k, d) and opt.state[A]["exp_avg_sq"].shape == (k, d)
        expected += 2 * k * d * 4 + 4 + 8 + 8  # fp32 M and V, step, skip counter; B: a counter alone
        assert set(opt.state[B]) == {"nonfinite_skips"}
    got = sum(t.numel() * t.element_size() for p in pairs for t in opt.state[p].values())
    assert got == expected
    lora_numel = sum(p.numel() for p in pairs)
    assert got > 4 * (2 * lora_numel * 4)  # far above AdamW's 2 (k + d) r floats, as Table 3 says


@pytest.mark.parametrize("cls", [LoRAPro, LoRAProSGD])
def test_lora_pro_first_step_from_zero_b(cls):
    prob, s = Problem(b_zero=True), 2.0
    A, B = prob.params(s)
    opt = cls(pairs=[(A, B, s)], lr=1e-3)
    a = A.detach().clone()
    prob.backward(A, B, s)
    opt.step()
    assert torch.equal(A.detach(), a)  # g_A = (1/s^2)(B^T B)^+ 0 + X A with X = 0
    assert torch.isfinite(B).all() and B.abs().sum() > 0


# ----------------------------------------------------------------------------- LoRA-RITE
def test_lora_rite_update_is_transformation_invariant():
    prob, s = Problem(), 2.0
    products, factors = [], []
    for transform in (False, True):
        A, B = prob.params(s, transform=transform)
        opt = LoRARite(pairs=[(A, B, s)], lr=1e-2)
        for _ in range(6):
            prob.backward(A, B, s)
            opt.step()
        products.append((B @ A).detach())
        factors.append(A.detach().clone())
    assert rel(products[1], products[0]) < 1e-9
    assert rel(factors[1], factors[0]) > 1e-2  # the factors themselves differ


def test_lora_rite_first_step_from_zero_b_is_finite():
    prob, s = Problem(b_zero=True), 2.0
    A, B = prob.params(s)
    opt = LoRARite(pairs=[(A, B, s)], lr=1e-2, balance_param=False)
    a = A.detach().clone()
    prob.backward(A, B, s)
    opt.step()
    assert torch.equal(A.detach(), a) and B.abs().sum() > 0 and torch.isfinite(B).all()
    assert opt.stats()["skipped_steps"] == 0


def test_lora_rite_clips_unmagnified_gradients_globally():
    prob, s = Problem(), 2.0
    deltas = []
    for c in (0.0, 1e-6):
        A, B = prob.params(s)
        opt = LoRARite(pairs=[(A, B, s)], lr=1e-2, clip_unmagnified_grad=c, update_capping=0,
                       update_skipping=0, balance_param=False, betas=(0.0, 0.0), eps=0.0)
        a = A.detach().clone()
        prob.backward(A, B, s)
        opt.step()
        deltas.append(A.detach() - a)
    # eps = 0 and no history: the preconditioned step is scale-free, clipping changes nothing
    assert rel(deltas[1], deltas[0]) < 1e-9


def test_lora_rite_update_skipping_capping_and_escape():
    prob, s = Problem(), 2.0
    A, B = prob.params(s)
    opt = LoRARite(pairs=[(A, B, s)], lr=1e-2, update_skipping=1e-12)  # every gradient "too large"
    a, b = A.detach().clone(), B.detach().clone()
    prob.backward(A, B, s)
    opt.step()
    assert torch.allclose(B @ A, b @ a, rtol=1e-12, atol=0)  # only balancing, which keeps BA
    escapes = {}
    for escape in (True, False):
        A, B = prob.params(s)
        opt = LoRARite(pairs=[(A, B, s)], lr=5e-2, apply_escape=escape, update_capping=1e-3)
        for _ in range(4):
            a, b = A.detach().clone(), B.detach().clone()
            prob.backward(A, B, s)
            opt.step()
            # capping: RMS(N) <= cap, and dW = -lr s (U_B N_A^T + N_B U_A^T) + O(lr^2)
            dW = s * (B @ A - b @ a).detach()
            assert dW.norm() <= 5e-2 * s * 1e-3 * ((10 * 3) ** 0.5 + (12 * 3) ** 0.5) * 1.01
        escapes[escape] = float(opt.state[A]["escape"]) + float(opt.state[B]["escape"])
    assert escapes[True] > 0 and escapes[False] == 0


@pytest.mark.parametrize("cls,kwargs,match", [  # the arguments every optimizer has: test_contract.py
    (LoRAPlus, dict(ratio=-1.0), "ratio"),
    (LoRAPlus, dict(betas=(0.9, 1.0)), "betas"),
    (ScaledGD, dict(ridge=-1.0), "ridge"),
    (ScaledAdamW, dict(eps=-1e-8), "eps"),
    (LoRARite, dict(update_capping=-1.0), "update_capping"),
    (LoRARite, dict(eps=float("nan")), "eps"),
    (LoRAPro, dict(x_mode="symmetric"), "x_mode"),
])
def test_invalid_method_specific_hyperparameters_are_rejected(cls, kwargs, match):
    A, B = Problem().params()
    with pytest.raises(ValueError, match=match):
        cls(pairs=[(A, B, 2.0)], **kwargs)
