"""The paper's identities, checked in float64 against autograd and least squares.

Theorem 1 (eq. 8), eq. (9)/(11), Theorem 2 (problem 10), Theorem 4 (transformation
invariance) and independent transcriptions of Algorithms 1 and 2.
"""

import pytest
import torch

from altlora import AltLoRA, AltLoRAPlus
from altlora.optim.altlora_reference import altlora_reference
from lowrank_problem import DT, Problem, proj_col, proj_row, rel

ETA = 0.05


def make(cls, prob, s, transform=False, **kw):
    """The optimizer as the paper prints it (A first, no clipping), unless ``kw`` says otherwise."""
    A, B = prob.params(s, transform)
    return A, B, cls(pairs=[(A, B, s)], lr=kw.pop("lr", ETA), convention=kw.pop("convention", "paper"), **kw)


def step(prob, A, B, s, opt):
    prob.backward(A, B, s)
    opt.step()


def lstsq_left(M, T):
    """argmin_X ||M X - T||_F."""
    return torch.linalg.lstsq(M, T).solution


def lstsq_right(M, T):
    """argmin_X ||X M - T||_F."""
    return torch.linalg.lstsq(M.T, T.T).solution.T


@pytest.mark.parametrize("s", [0.5, 2.0, 4.0])
def test_theorem1_steps_are_least_squares_solutions(s):
    prob = Problem()
    A, B, opt = make(AltLoRA, prob, s, beta1=0.0, ridge=0.0)
    A0, B0 = A.detach().clone(), B.detach().clone()

    G = prob.full_grad(A0, B0, s)  # problem (4) at W_t
    step(prob, A, B, s, opt)
    direction_A = (A0 - A.detach()) / ETA
    assert rel(direction_A, lstsq_left(s * B0, G)) < 1e-10
    assert torch.equal(B.detach(), B0)  # only A moved

    A1 = A.detach().clone()
    G_half = prob.full_grad(A1, B0, s)  # problem (6) at the half-updated point W_{t+1/2}
    step(prob, A, B, s, opt)
    direction_B = (B0 - B.detach()) / ETA
    assert rel(direction_B, lstsq_right(s * A1, G_half)) < 1e-10
    assert torch.equal(A.detach(), A1)


def test_equation9_induced_update_is_projected_gradient_and_independent_of_s():
    prob = Problem()
    deltas = []
    for s in (0.5, 2.0, 4.0):
        A = torch.nn.Parameter(prob.A0.clone())
        B = torch.nn.Parameter(prob.B0 * (2.0 / s))  # same W for every s
        opt = AltLoRA(pairs=[(A, B, s)], lr=ETA, beta1=0.0, ridge=0.0, convention="paper")
        W_t = prob.W(A, B, s).detach()
        G_t = prob.full_grad(A.detach(), B.detach(), s)
        Bt = B.detach().clone()
        step(prob, A, B, s, opt)
        A_next = A.detach().clone()
        G_half = prob.full_grad(A_next, Bt, s)
        step(prob, A, B, s, opt)
        delta = prob.W(A, B, s).detach() - W_t
        expected = -ETA * proj_col(Bt) @ G_t - ETA * G_half @ proj_row(A_next)
        assert rel(delta, expected) < 1e-10
        deltas.append(delta)
    for d in deltas[1:]:
        assert rel(d, deltas[0]) < 1e-10


def test_theorem2_projected_momentum_solves_problem10():
    prob, s, beta1 = Problem(), 2.0, 0.9
    A, B, opt = make(AltLoRA, prob, s, beta1=beta1, ridge=0.0)

    # step 0 (A), step 1 (B)
    B_prev = B.detach().clone()  # B current at the A-step
    step(prob, A, B, s, opt)
    M_A = opt.state[A]["exp_avg"].clone()
    A_prev = A.detach().clone()  # A current at the B-step
    step(prob, A, B, s, opt)
    M_B = opt.state[B]["exp_avg"].clone()  # stored in B's own (k, r) shape

    # step 2 (A): M~A = argmin ||B_prev M_A - B M~||
    Bn, An = B.detach().clone(), A.detach().clone()
    G = prob.full_grad(An, Bn, s)
    step(prob, A, B, s, opt)
    M_tilde = lstsq_left(Bn, B_prev @ M_A)
    expected = beta1 * M_tilde + (1 - beta1) * lstsq_left(s * Bn, G)
    assert rel(opt.state[A]["exp_avg"], expected) < 1e-10
    # the projected momentum lifted to W-space is Proj_c(B)(B_prev M)
    assert rel(Bn @ M_tilde, proj_col(Bn) @ (B_prev @ M_A)) < 1e-10

    # step 3 (B): M~B = argmin ||M_B A_prev - M~ A||
    An, Bn = A.detach().clone(), B.detach().clone()
    G = prob.full_grad(An, Bn, s)
    step(prob, A, B, s, opt)
    M_tilde = lstsq_right(An, M_B @ A_prev)
    expected = beta1 * M_tilde + (1 - beta1) * lstsq_right(s * An, G)
    assert rel(opt.state[B]["exp_avg"], expected) < 1e-10


@pytest.mark.parametrize("first,mode", [("A", "alternating"), ("B", "alternating"), (None, "joint")])
def test_theorem4_transformation_invariance(first, mode):
    """Joint updates (Table 9's ablation) keep it: each factor's step is equivariant."""
    prob, s, steps = Problem(), 2.0, 60
    kw = dict(beta1=0.9, weight_decay=0.1, ridge=0.0, first=first, mode=mode)
    A1, B1, o1 = make(AltLoRA, prob, s, **kw)
    A2, B2, o2 = make(AltLoRA, prob, s, transform=True, **kw)
    assert rel(B2 @ A2, B1 @ A1) < 1e-12
    for _ in range(steps):
        step(prob, A1, B1, s, o1)
        step(prob, A2, B2, s, o2)
    assert rel((B2 @ A2).detach(), (B1 @ A1).detach()) < 1e-10
    assert rel(A2.detach(), prob.R @ A1.detach()) < 1e-10
    assert rel((B1 @ A1).detach(), (prob.B0 @ prob.A0)) > 1e-2  # it really trained


def test_theorem4_negative_control_adamw_is_not_invariant():
    prob, s, steps = Problem(), 2.0, 60
    runs = []
    for transform in (False, True):
        A, B = prob.params(s, transform)
        opt = torch.optim.AdamW([A, B], lr=ETA, weight_decay=0.1)
        for _ in range(steps):
            step(prob, A, B, s, opt)
        runs.append((B @ A).detach())
    assert rel(runs[1], runs[0]) > 1e-2


def test_altlora_plus_is_not_invariant():
    """Paper §4.2 / D.2: the element-wise second moment breaks invariance."""
    prob, s = Problem(), 2.0
    A1, B1, o1 = make(AltLoRAPlus, prob, s, ridge=0.0, lr=1e-2)
    A2, B2, o2 = make(AltLoRAPlus, prob, s, ridge=0.0, lr=1e-2, transform=True)
    for _ in range(40):
        step(prob, A1, B1, s, o1)
        step(prob, A2, B2, s, o2)
    assert rel((B2 @ A2).detach(), (B1 @ A1).detach()) > 1e-3


@pytest.mark.parametrize("plus", [False, True], ids=["altlora", "altlora_plus"])
@pytest.mark.parametrize("first,switch_every,mode,clip,relative_ridge", [
    ("A", 1, "alternating", None, 0.0), ("B", 1, "alternating", None, 0.0), ("B", 3, "alternating", None, 0.0),
    (None, 1, "joint", None, 0.0), ("B", 1, "alternating", 0.02, 0.0), (None, 1, "joint", 0.02, 0.0),
    ("B", 1, "alternating", 0.02, 1.0), ("B", 3, "alternating", None, 1.0),
    (None, 1, "joint", 0.02, 1.0),  # AltLoRA+'s library default (joint, clipped, relative ridge)
])
def test_every_step_matches_the_paper_shaped_reference(plus, first, switch_every, mode, clip, relative_ridge):
    """The fast path against ``altlora_reference`` (Algorithms 1-2 as printed, plus clipping
    and the relative ridge), compared after every step. Float64 on a problem whose Grams stay
    well conditioned (cond < 1e3): 20 steps agree to 1e-10 relative."""
    prob, s, steps = Problem(), 2.0, 20
    kw = dict(first=first, switch_every=switch_every, mode=mode, weight_decay=0.01, ridge=1e-6,
              relative_ridge=relative_ridge, lr=1e-2 if plus else ETA, max_grad_norm=clip)
    opt_kw = dict(betas=(0.9, 0.999), eps=1e-8) if plus else dict(beta1=0.9)
    A, B, opt = make(AltLoRAPlus if plus else AltLoRA, prob, s, **kw, **opt_kw)
    iterates = altlora_reference(prob.A0, prob.B0, s, lambda a, b: prob.full_grad(a, b, s), steps, plus=plus,
                                 **{**kw, "first": first or "A"})  # joint: no order to choose
    coefs = []
    for t, (A_ref, B_ref) in enumerate(iterates):
        step(prob, A, B, s, opt)
        coefs.append(1.0 if opt.last_clip_coef is None else opt.last_clip_coef.item())
        assert rel(A.detach(), A_ref) < 1e-10 and rel(B.detach(), B_ref) < 1e-10, t
    assert rel(iterates[-1][1], prob.B0) > 1e-3  # both factors moved
    assert (min(coefs) < 1) == bool(clip)  # the clipped cases do clip


def test_a_first_with_zero_B_changes_A_only_by_weight_decay():
    """§8 item 10: B0 = 0 makes grad_A = 0, so the first A-step is pure decay; then the first
    B-step is the scaled step, and the A-momentum projected through B2^T B0 = 0 vanishes."""
    prob, s, wd = Problem(b_zero=True), 2.0, 0.1
    A, B, opt = make(AltLoRA, prob, s, weight_decay=wd)
    A0 = A.detach().clone()
    step(prob, A, B, s, opt)
    assert torch.allclose(A.detach(), A0 * (1 - ETA * wd), rtol=0, atol=1e-15)
    step(prob, A, B, s, opt)
    assert B.detach().abs().max() > 0
    # the basis change stored for A's next step is B_new^T B_0 = 0: old momentum is dropped
    assert torch.count_nonzero(opt.state[B]["basis_cross"]) == 0


@pytest.mark.parametrize("factor", ["A", "B"])
def test_float32_step_is_as_accurate_as_a_direct_cholesky_solve(factor):
    """The r x r operators applied by matmul lose nothing against solving with the (r, m)
    right-hand side directly: on an ill-conditioned Gram (cond 1e4) both float32 paths have
    the same error against float64."""
    g = torch.Generator().manual_seed(3)
    k, d, r, s, ridge = 64, 48, 4, 2.0, 1e-6

    def ill_conditioned(rows, cols):  # singular values 1 .. 1e-2
        U = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=DT)).Q
        V = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=DT)).Q
        return U @ torch.diag(torch.logspace(0, -2, r, dtype=DT)) @ V.T

    if factor == "A":
        A, B = torch.zeros(r, d, dtype=DT), ill_conditioned(k, r)
        Y, grad = B.T, torch.randn(r, d, generator=g, dtype=DT)
    else:
        A, B = ill_conditioned(r, d), torch.zeros(k, r, dtype=DT)
        Y, grad = A, torch.randn(k, r, generator=g, dtype=DT)
    G = grad if factor == "A" else grad.T               # rank-first
    K = Y @ Y.T + ridge * torch.eye(r, dtype=DT)
    exact = torch.linalg.solve(K, G) / s**2
    direct = torch.cholesky_solve(G.float(), torch.linalg.cholesky(K.float())).double() / s**2

    A32, B32 = torch.nn.Parameter(A.float()), torch.nn.Parameter(B.float())
    opt = AltLoRA(pairs=[(A32, B32, s)], lr=1.0, beta1=0.0, ridge=ridge, first=factor, convention="paper")
    active = A32 if factor == "A" else B32
    active.grad = grad.float()
    opt.step()
    ours = -active.detach().double()                   # the factor started at zero
    ours = ours if factor == "A" else ours.T
    assert rel(direct, exact) > 1e-6  # hard enough for float32 to show
    assert rel(ours, exact) < 3 * rel(direct, exact)


@pytest.mark.parametrize("first", ["A", "B"])
def test_relative_ridge_is_lambda_plus_rho_times_the_mean_eigenvalue(first):
    prob, s, rho = Problem(), 2.0, 0.05
    A, B, opt = make(AltLoRA, prob, s, beta1=0.0, ridge=1e-6, relative_ridge=rho, first=first)
    A0, B0 = A.detach().clone(), B.detach().clone()
    G = prob.full_grad(A0, B0, s)
    step(prob, A, B, s, opt)
    Y = B0.T if first == "A" else A0
    gram = Y @ Y.T
    K = gram + (1e-6 + rho * gram.trace() / 3) * torch.eye(3, dtype=DT)
    grad = s * B0.T @ G if first == "A" else (s * G @ A0.T).T
    expected = -ETA * torch.linalg.solve(K, grad) / s**2      # rank-first
    got = (A.detach() - A0) if first == "A" else (B.detach() - B0).T
    assert rel(got, expected) < 1e-12  # float64; K's condition number is below 1/rho
