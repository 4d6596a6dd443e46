"""Gradient clipping in AltLoRA's own geometry (``max_grad_norm``), checked in float64.

The clipped quantity is the full-weight step of each pair's scaled gradient, ``s B g~_A`` or
``s g~_B A``, global over pairs (and the raw gradients of non-LoRA tensors). At ridge 0 it is
the projected full gradient of Theorem 1, so clipping keeps Theorem 4's invariance.
"""

import pytest
import torch

from altlora import AltLoRA, AltLoRAPlus
from lowrank_problem import DT, Problem, proj_col, proj_row, rel

ETA = 0.05


def pair(prob, s=2.0, transform=False):
    A, B = prob.params(s, transform)
    return A, B


@pytest.mark.parametrize("first", ["A", "B"])
def test_lifted_norm_is_the_projected_full_gradient(first):
    """Theorem 1 at ridge 0: ||s B g~_A|| = ||Proj_c(B) G||, ||s g~_B A|| = ||G Proj_r(A)||."""
    prob, s = Problem(), 2.0
    A, B = pair(prob, s)
    opt = AltLoRA(pairs=[(A, B, s)], lr=ETA, ridge=0.0, max_grad_norm=1e9, first=first, mode="alternating")
    G = prob.full_grad(A.detach(), B.detach(), s)
    expected = (proj_col(B.detach()) @ G if first == "A" else G @ proj_row(A.detach())).norm()
    prob.backward(A, B, s)
    opt.step()
    assert rel(opt.last_grad_norm, expected) < 1e-12  # two float64 routes to one well-conditioned norm
    assert opt.last_clip_coef == 1.0


def test_joint_step_clips_both_half_steps_together():
    """Joint updates (the default): the clipped norm is that of both full-weight steps,
    ``sqrt(||Proj_c(B) G||^2 + ||G Proj_r(A)||^2)`` at ridge 0."""
    prob, s = Problem(), 2.0
    A, B = pair(prob, s)
    opt = AltLoRA(pairs=[(A, B, s)], lr=ETA, ridge=0.0, max_grad_norm=1e9)
    G = prob.full_grad(A.detach(), B.detach(), s)
    expected = ((proj_col(B.detach()) @ G).norm() ** 2 + (G @ proj_row(A.detach())).norm() ** 2).sqrt()
    prob.backward(A, B, s)
    opt.step()
    assert opt.param_groups[0]["mode"] == "joint"
    assert rel(opt.last_grad_norm, expected) < 1e-12  # float64, as above


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("relative_ridge", [0.0, 1.0, 100.0])
def test_lifted_norm_with_a_ridge_is_that_of_the_explicit_full_weight_steps(dtype, relative_ridge):
    """The clipped norm is computed as ``<S, grad> - lam ||S||^2`` with ``S = K^-1 grad``; here it
    is held to the full-weight steps ``s B g~_A`` and ``s g~_B A`` formed explicitly in float64,
    with ridges from negligible to 100x the Grams' mean eigenvalue (where the difference cancels)."""
    prob, s = Problem(), 2.0
    A64, B64 = pair(prob, s)
    prob.backward(A64, B64, s)
    A, B = (torch.nn.Parameter(t.detach().to(dtype)) for t in (A64, B64))
    A.grad, B.grad = A64.grad.to(dtype), B64.grad.to(dtype)
    a, b, ga, gb = (t.detach().to(DT, copy=True) for t in (A, B, A.grad, B.grad))  # what it will see
    opt = AltLoRA(pairs=[(A, B, s)], lr=ETA, ridge=1e-6, relative_ridge=relative_ridge, max_grad_norm=1e9)
    opt.step()

    r, eye = a.shape[0], torch.eye(a.shape[0], dtype=DT)
    gram_b, gram_a = b.T @ b, a @ a.T
    lam_a = 1e-6 + relative_ridge * gram_b.trace() / r  # the ridge of A's solve comes from B's Gram
    lam_b = 1e-6 + relative_ridge * gram_a.trace() / r
    step_a = s * b @ torch.linalg.solve(gram_b + lam_a * eye, ga) / s**2
    step_b = s * torch.linalg.solve(gram_a + lam_b * eye, gb.T).T / s**2 @ a
    expected = (step_a.norm() ** 2 + step_b.norm() ** 2).sqrt()
    # Round-off: K^-1 is accurate to cond(K) u; each dot product to m u of its own size, and the
    # difference to (1 + 2 lam / mu_min) times that relative to the result (mu_min: smallest
    # Gram eigenvalue, ~0.1-0.6 here); generous factor 10 for the other roundings.
    u = torch.finfo(dtype).eps
    worst = 0.0
    for gram, lam in ((gram_b, lam_a), (gram_a, lam_b)):
        ev = torch.linalg.eigvalsh(gram)
        cond = ((ev[-1] + lam) / (ev[0] + lam)).item()
        worst = max(worst, (cond + max(prob.k, prob.d)) * (1 + 2 * lam.item() / ev[0].item()))
    assert rel(opt.last_grad_norm, expected) < 10 * u * worst


@pytest.mark.parametrize("first", ["A", "B"])
@pytest.mark.parametrize("fraction", [0.3, 2.0], ids=["clipped", "not-clipped"])
def test_clipped_step_is_the_unclipped_step_times_min_1_c_over_norm(first, fraction):
    prob, s = Problem(), 2.0
    steps, norms = [], []
    for max_norm in (1e9, None):  # measure the norm unclipped, then clip at fraction x norm
        A, B = pair(prob, s)
        opt = AltLoRA(pairs=[(A, B, s)], lr=ETA, first=first, mode="alternating",
                      max_grad_norm=max_norm if max_norm else fraction * norms[0])
        prob.backward(A, B, s)
        opt.step()
        steps.append(A.detach() - prob.A0 if first == "A" else B.detach() - prob.B0)
        norms.append(opt.last_grad_norm.item())
    assert norms[1] == norms[0]  # the norm is taken before clipping
    coef = min(1.0, fraction * norms[0] / (norms[0] + 1e-6))  # torch's clip_grad_norm_ formula
    assert opt.last_clip_coef.item() == pytest.approx(coef, rel=1e-15)
    assert rel(steps[1], coef * steps[0]) < 1e-12  # float64; coef enters one r x r operator


@pytest.mark.parametrize("mode,first", [("alternating", "A"), ("alternating", "B"), ("joint", "auto")])
def test_clipped_trajectory_is_transformation_invariant(mode, first):
    """Theorem 4 with clipping active at every step (max_grad_norm well below the norms)."""
    prob, s, steps = Problem(), 2.0, 60
    kw = dict(lr=ETA, beta1=0.9, weight_decay=0.1, ridge=0.0, mode=mode, first=first, max_grad_norm=0.05)
    runs, coefs = [], []
    for transform in (False, True):
        A, B = pair(prob, s, transform)
        opt = AltLoRA(pairs=[(A, B, s)], **kw)
        for _ in range(steps):
            prob.backward(A, B, s)
            opt.step()
            coefs.append(opt.last_clip_coef.item())
        runs.append((B @ A).detach())
    assert max(coefs) < 1  # clipped at every step
    assert rel(runs[1], runs[0]) < 1e-10
    assert rel(runs[0], prob.B0 @ prob.A0) > 1e-2  # it really trained


def test_raw_gradient_clipping_breaks_invariance():
    """Negative control: clipping the raw factor gradients (what a Trainer does) is not invariant."""
    prob, s, steps = Problem(), 2.0, 60
    runs = []
    for transform in (False, True):
        A, B = pair(prob, s, transform)
        opt = AltLoRA(pairs=[(A, B, s)], lr=ETA, ridge=0.0)
        for _ in range(steps):
            prob.backward(A, B, s)
            torch.nn.utils.clip_grad_norm_([A, B], 0.05)
            opt.step()
        runs.append((B @ A).detach())
    assert rel(runs[1], runs[0]) > 1e-3


def test_altlora_plus_clips_the_scaled_gradient_entering_both_moments():
    prob, s = Problem(), 2.0
    states = []
    for max_norm in (None, 1e-4):
        A, B = pair(prob, s)
        opt = AltLoRAPlus(pairs=[(A, B, s)], lr=1e-2, max_grad_norm=max_norm)
        prob.backward(A, B, s)
        opt.step()
        states.append((opt.state[A]["exp_avg"].clone(), opt.state[A]["exp_avg_sq"].clone(), opt.last_clip_coef))
    (m0, v0, _), (m1, v1, coef) = states
    assert coef < 1e-2
    assert rel(m1, coef * m0) < 1e-12 and rel(v1, coef**2 * v0) < 1e-12


def test_global_norm_includes_the_aux_tensors_and_leaves_their_grad_untouched():
    prob, s = Problem(), 2.0
    A, B = pair(prob, s)
    head = torch.nn.Parameter(torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(1)))
    twin = torch.nn.Parameter(head.detach().clone())
    opt = AltLoRA([A, B, head], pairs=[(A, B, s)], lr=ETA, ridge=0.0, aux_lr=1e-3, max_grad_norm=1e-3,
                  mode="alternating", first="A")
    ref = torch.optim.AdamW([twin], lr=1e-3, weight_decay=0.0)
    prob.backward(A, B, s)
    head.grad = torch.ones_like(head)
    G = prob.full_grad(A.detach(), B.detach(), s)
    lift = (proj_col(B.detach()) @ G).norm()
    opt.step()
    total = (lift**2 + head.grad.norm() ** 2).sqrt()
    assert rel(opt.last_grad_norm, total) < 1e-12
    assert torch.equal(head.grad, torch.ones_like(head))  # not scaled in place
    coef = opt.last_clip_coef.item()
    twin.grad = coef * torch.ones_like(twin)
    ref.step()
    assert torch.allclose(head, twin, rtol=0, atol=1e-15)


def test_a_non_finite_pair_is_skipped_and_left_out_of_the_norm():
    prob, s = Problem(), 2.0
    A1, B1 = pair(prob, s)
    A2, B2 = pair(prob, s)
    opt = AltLoRA(pairs=[(A1, B1, s), (A2, B2, s)], lr=ETA, ridge=0.0, max_grad_norm=1e9, batched=False,
                  mode="alternating", first="A")
    prob.backward(A1, B1, s)
    prob.backward(A2, B2, s)
    A2.grad[0, 0] = float("nan")
    G = prob.full_grad(A1.detach(), B1.detach(), s)
    opt.step()
    assert rel(opt.last_grad_norm, (proj_col(B1.detach()) @ G).norm()) < 1e-12
    assert torch.equal(A2.detach(), prob.A0) and not torch.equal(A1.detach(), prob.A0)


def test_first_auto_starts_with_the_factor_whose_gradient_is_not_zero():
    for b_zero, want in ((True, "B"), (False, "A")):
        prob, s = Problem(b_zero=b_zero), 2.0
        A, B = pair(prob, s)
        opt = AltLoRA(pairs=[(A, B, s)], lr=ETA, first="auto", mode="alternating")
        assert opt.phase() == want
        prob.backward(A, B, s)
        opt.step()
        assert opt.param_groups[0]["first"] == want  # resolved once, saved with the group
        moved = "A" if not torch.equal(A.detach(), prob.A0) else "B" if not torch.equal(B.detach(), prob.B0) else ""
        assert moved == want
    A, B = torch.nn.Parameter(torch.zeros(3, 10, dtype=DT)), torch.nn.Parameter(torch.randn(12, 3, dtype=DT))
    assert AltLoRA(pairs=[(A, B, 2.0)], first="auto", mode="alternating").phase() == "A"  # zero A: grad_B = 0, start with A
