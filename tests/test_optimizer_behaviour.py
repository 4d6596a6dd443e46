"""Optimizer contract: alternation, accumulation, resume, schedulers, precision, bad input."""


import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from altlora import AltLoRA, AltLoRAPlus
from altlora.optim import REGISTRY
from altlora.optim import altlora as altlora_module
from altlora.optim.altlora import AltLoRABase
from lowrank_problem import DT, Problem, rel

# AltLoRA and AltLoRA+ (the generic optimizer contract is in test_contract.py)
CLASSES = [cls for name, cls in REGISTRY.items() if name == cls.name and issubclass(cls, AltLoRABase)]
IDS = [cls.name for cls in CLASSES]


def tiny_peft_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(dtype)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      modules_to_save=["lm_head"])
    return get_peft_model(model, lcfg)


def batch(seed, n=4, length=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, length), generator=g)


def train(model, opt, steps, start=0, sched=None):
    for t in range(start, start + steps):
        x = batch(t)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_only_the_active_factor_and_its_state_change(cls):
    prob, s = Problem(), 2.0
    A, B = prob.params(s)
    opt = cls(pairs=[(A, B, s)], lr=1e-2, first="B", mode="alternating")
    for t in range(6):
        active, inactive = (B, A) if t % 2 == 0 else (A, B)
        before = inactive.detach().clone()
        st_before = {k: v.clone() for k, v in opt.state[inactive].items()}
        assert opt.phase() == ("B" if t % 2 == 0 else "A")
        prob.backward(A, B, s)
        act_before = active.detach().clone()
        opt.step()
        assert torch.equal(inactive.detach(), before)
        assert all(torch.equal(opt.state[inactive][k], v) for k, v in st_before.items())
        if t > 0:  # the very first B-step from B0 != 0 moves too; check every step after
            assert not torch.equal(active.detach(), act_before)


@pytest.mark.parametrize("mode,first,every,expected", [
    ("alternating", "A", 1, "ABABAB"),
    ("alternating", "B", 1, "BABABA"),
    ("alternating", "B", 2, "BBAABB"),
    ("alternating", "A", 3, "AAABBB"),
    ("joint", None, 1, ["AB"] * 6),
])
def test_schedule_of_updated_factors(mode, first, every, expected):
    prob, s = Problem(), 2.0
    A, B = prob.params(s)
    opt = AltLoRA(pairs=[(A, B, s)], lr=1e-2, first=first, switch_every=every, mode=mode)
    seen = []
    for _ in range(6):
        a0, b0 = A.detach().clone(), B.detach().clone()
        prob.backward(A, B, s)
        opt.step()
        seen.append(("A" if not torch.equal(A.detach(), a0) else "") +
                    ("B" if not torch.equal(B.detach(), b0) else ""))
    assert seen == list(expected)


def test_switch_every_one_keeps_no_copy_of_the_other_factor():
    """Issue item 8: state is one momentum per factor plus r x r (about half of AdamW's)."""
    model = tiny_peft_llama()
    opt = AltLoRA(model, lr=1e-2)
    adam = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train(model, opt, 4)
    train(model, adam, 1)
    for group in opt.param_groups:
        if not group["lora"]:
            continue
        for p in group["params"]:
            st = opt.state[p]
            assert set(st) == {"exp_avg", "basis_cross", "nonfinite_skips"}
            assert st["exp_avg"].numel() == p.numel()
            assert st["basis_cross"].shape == (4, 4)
            # exactly: momentum + r x r basis change + a skip counter
            assert _state_bytes(opt, [p]) == p.numel() * 4 + 4 * 4 * 4 + 8


def _state_bytes(opt, params):
    return sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values()
               if torch.is_tensor(t))


def test_state_is_about_half_of_adamw_on_a_realistic_pair():
    A = torch.nn.Parameter(torch.randn(8, 1024) / 32)
    B = torch.nn.Parameter(torch.randn(1024, 8) / 32)
    opt = AltLoRA(pairs=[(A, B, 2.0)], lr=1e-3, mode="joint")
    adam = torch.optim.AdamW([A, B], lr=1e-3)
    A.grad, B.grad = torch.randn_like(A), torch.randn_like(B)
    opt.step()
    adam.step()
    assert _state_bytes(opt, [A, B]) / _state_bytes(adam, [A, B]) < 0.51


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_gradient_accumulation_equals_big_batch(cls):
    prob, s = Problem(n=40), 2.0
    A1, B1 = prob.params(s)
    A2, B2 = prob.params(s)
    o1 = cls(pairs=[(A1, B1, s)], lr=1e-2)
    o2 = cls(pairs=[(A2, B2, s)], lr=1e-2)
    X, Y = prob.X, prob.Y
    for _ in range(6):
        prob.backward(A1, B1, s)
        o1.step()
        o2.zero_grad()
        for chunk in range(4):  # 4 micro-batches, losses averaged as a Trainer does
            sl = slice(10 * chunk, 10 * chunk + 10)
            W = prob.W(A2, B2, s)
            (((torch.tanh(X[sl] @ W.T) - Y[sl]) ** 2).mean() / 4).backward()
        o2.step()
    assert rel(A2.detach(), A1.detach()) < 1e-12
    assert rel(B2.detach(), B1.detach()) < 1e-12


def test_scheduler_changes_are_followed_during_training():
    """The research code read self.defaults['lr']; ours follows group['lr'] at every step."""
    prob, s = Problem(), 2.0
    A, B = prob.params(s)
    opt = AltLoRA(pairs=[(A, B, s)], lr=1e-2, beta1=0.0)
    prob.backward(A, B, s)
    opt.step()  # A-step
    for g in opt.param_groups:
        g["lr"] = 0.0
    a, b = A.detach().clone(), B.detach().clone()
    for _ in range(2):
        prob.backward(A, B, s)
        opt.step()
    assert torch.equal(A.detach(), a) and torch.equal(B.detach(), b)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_bf16_run_tracks_the_float32_run(cls):
    """bf16 parameters with float32 state (the state itself: test_contract.py) stay within bf16's
    resolution of the float32 trajectory over 20 steps."""
    prob, s = Problem(), 2.0
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        A = torch.nn.Parameter(prob.A0.to(dtype))
        B = torch.nn.Parameter(prob.B0.to(dtype))
        opt = cls(pairs=[(A, B, s)], lr=1e-2, first="B")
        for _ in range(20):
            A.grad = B.grad = None
            W = prob.W0.float() + s * B.float() @ A.float()
            ((torch.tanh(prob.X.float() @ W.T) - prob.Y.float()) ** 2).mean().backward()
            opt.step()
        results[dtype] = (B.float() @ A.float()).detach()
    assert torch.isfinite(results[torch.bfloat16]).all()
    assert rel(results[torch.bfloat16], results[torch.float32]) < 5e-2


def test_released_code_convention_scales_by_s2_and_corrects_bias():
    prob, s = Problem(), 4.0
    steps = {}
    for convention in ("paper", "released_code"):
        A, B = prob.params(s)
        opt = AltLoRA(pairs=[(A, B, s)], lr=1e-3, convention=convention)
        a0 = A.detach().clone()
        prob.backward(A, B, s)
        opt.step()
        steps[convention] = A.detach() - a0
    # paper: lr (1 - b1) g~ ; released code: lr * s^2 g~ (bias correction undoes (1 - b1))
    assert rel(steps["released_code"], steps["paper"] * s**2 / (1 - 0.9)) < 1e-9


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_conventions_fill_only_the_options_left_at_none(cls):
    """``"paper"`` is Algorithms 1-2 as printed for both classes; ``"default"`` is this library's
    measured defaults, joint updates, with a relative ridge for AltLoRA+ (BENCHMARKS.md 7.1);
    an option the user passes wins over either."""
    prob, s = Problem(), 2.0

    def options(**kw):
        A, B = prob.params(s)
        opt = cls(pairs=[(A, B, s)], **kw)
        group = next(g for g in opt.param_groups if g.get("lora"))
        return dict(mode=group["mode"], relative_ridge=group["relative_ridge"], first=group["first"],
                    max_grad_norm=opt.max_grad_norm)

    assert options(convention="paper") == dict(mode="alternating", relative_ridge=0.0, first="A", max_grad_norm=None)
    assert options() == dict(mode="joint", relative_ridge=1.0 if cls is AltLoRAPlus else 0.0,
                             first="auto", max_grad_norm=1.0)
    assert options(mode="alternating", relative_ridge=0.5, first="B") == dict(
        mode="alternating", relative_ridge=0.5, first="B", max_grad_norm=1.0)
    assert options(first="B")["mode"] == options(switch_every=2)["mode"] == "alternating"  # an order implies it


@pytest.mark.parametrize("kw", [dict(), dict(mode="alternating", switch_every=3, first="B", weight_decay=0.1),
                                dict(mode="alternating")], ids=["default", "switch3", "alternating"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_batched_path_equals_per_pair_path(cls, kw, monkeypatch):
    """``batched=True`` (stacked bmm, the CUDA default) and ``False`` (per-pair matmuls, the CPU
    default) are the same algorithm: float64 runs agree to rounding. The per-pair path cut into
    chunks of one pair does the same operations on every pair: bit for bit the one-chunk run."""
    runs = {}
    for path in ("per_pair", "batched", "chunked"):
        monkeypatch.setattr(altlora_module, "_CHUNK_NUMEL", 1 if path == "chunked" else 10**9)
        model = tiny_peft_llama(dtype=torch.float64)
        opt = cls(model, lr=1e-2, batched=path == "batched", **kw)
        train(model, opt, 7)
        runs[path] = (snapshot(model), opt)
    (a, opt_a), (b, opt_b), (c, opt_c) = runs["per_pair"], runs["batched"], runs["chunked"]
    for k in a:
        assert rel(b[k], a[k]) < 1e-12, k
        assert torch.equal(c[k], a[k]), k
    for p_a, p_b, p_c in zip(*(o.param_groups[0]["params"] for o in (opt_a, opt_b, opt_c))):
        assert rel(opt_b.state[p_b]["exp_avg"], opt_a.state[p_a]["exp_avg"]) < 1e-12
        assert torch.equal(opt_c.state[p_c]["exp_avg"], opt_a.state[p_a]["exp_avg"])


@pytest.mark.parametrize("path", ["per_pair", "chunked", "batched"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_nonfinite_pair_keeps_its_momentum_on_every_path(cls, path, monkeypatch):
    """The bad pair is the second: in its own chunk on the chunked path."""
    monkeypatch.setattr(altlora_module, "_CHUNK_NUMEL", 1 if path == "chunked" else 10**9)
    prob, s = Problem(), 2.0
    A1, B1 = prob.params(s)
    A2, B2 = prob.params(s)
    opt = cls(pairs=[(A1, B1, s, "good"), (A2, B2, s, "bad")], lr=1e-2, batched=path == "batched")
    prob.backward(A1, B1, s)
    prob.backward(A2, B2, s)
    A2.grad[0, 0] = float("nan")
    a1, a2 = A1.detach().clone(), A2.detach().clone()
    opt.step()
    assert not torch.equal(A1.detach(), a1)
    assert torch.equal(A2.detach(), a2)
    assert torch.count_nonzero(opt.state[A2]["exp_avg"]) == 0
    assert opt.stats()["skipped_steps"] == 1
    # the basis change for B's momentum (Theorem 2): A_new A_old^T, and A_old A_old^T for the
    # skipped pair. Float64 sums of d = 10 products in another order: relative error at most
    # d u ||A||_F^2 / ||A A^T||_F <= 10 * 1.1e-16 * sqrt(r) ~ 2e-15 (A has r = 3 independent rows)
    assert rel(opt.state[A1]["basis_cross"], A1.detach() @ a1.T) < 1e-13
    assert rel(opt.state[A2]["basis_cross"], a2 @ a2.T) < 1e-13


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_moment_layout_is_a_speed_choice_only(cls, monkeypatch):
    """From ``_FACTOR_LAYOUT_RANK`` on, B's moments are (k, r) tensors in B's own memory layout
    (elementwise work then reads memory in order); below it they are rank-first. The per-pair
    path gives the same float64 trajectory either way, to rounding (BLAS sums in another order)."""
    runs = []
    for threshold in (1, 10**9):
        monkeypatch.setattr(altlora_module, "_FACTOR_LAYOUT_RANK", threshold)
        prob, s = Problem(), 2.0
        A, B = prob.params(s)
        opt = cls(pairs=[(A, B, s)], lr=1e-2, batched=False)
        for _ in range(5):
            prob.backward(A, B, s)
            opt.step()
        keys = ("exp_avg", "exp_avg_sq") if cls is AltLoRAPlus else ("exp_avg",)
        for key in keys:
            assert opt.state[A][key].stride() == A.stride()
            m = opt.state[B][key]
            assert m.shape == B.shape
            assert m.stride() == (B.stride() if threshold == 1 else B.T.contiguous().T.stride()), (key, m.stride())
        runs.append((A.detach().clone(), B.detach().clone(), [opt.state[p][k].clone() for p in (A, B) for k in keys]))
    (a1, b1, st1), (a2, b2, st2) = runs
    assert rel(a1, a2) < 1e-12 and rel(b1, b2) < 1e-12  # float64, 5 steps of well-conditioned r x r algebra
    assert all(rel(x, y) < 1e-12 for x, y in zip(st1, st2))


@pytest.mark.parametrize("plus", [False, True], ids=["altlora", "altlora_plus"])
def test_in_place_directions_give_the_pure_update(plus):
    """With ``x_gram`` (joint updates: the caller writes ``X <- (1 - lr wd) X - (lr / bc1) D`` in
    place, the basis change comes from ``X X^T``) and without it (new tensors), the kernel makes
    one update: float64, four pairs with weight decay, bias correction and a non-finite gradient."""
    g = torch.Generator().manual_seed(3)
    n, r, m = 4, 3, 11
    xs = [torch.randn(r, m, generator=g, dtype=DT) for _ in range(n)]
    ys = [torch.randn(r, 7, generator=g, dtype=DT) for _ in range(n)]
    grads = [torch.randn(r, m, generator=g, dtype=DT) for _ in range(n)]
    grads[2][1, 4] = float("nan")
    moments = [torch.randn(r, m, generator=g, dtype=DT) for _ in range(n)]
    seconds = [torch.rand(r, m, generator=g, dtype=DT) for _ in range(n)] if plus else None
    gram = torch.stack([y @ y.T for y in ys])
    cross = gram + 0.1 * torch.randn(n, r, r, generator=g, dtype=DT)
    kw = dict(inv_s2=0.25, lr=0.05, beta1=0.9, beta2=0.99 if plus else 0.0, eps=1e-8 if plus else 0.0,
              weight_decay=0.1, ridge=1e-3, bc1=0.5, bc2=0.3 if plus else 1.0, clip_coef=0.7)
    x_new, m_a, v_a, ok_a, cross_a = altlora_module.altlora_factor_update(
        xs, grads, [t.clone() for t in moments], seconds, gram, cross, starts=xs, **kw)
    x_gram = torch.stack([x @ x.T for x in xs])
    d, m_b, v_b, ok_b, cross_b = altlora_module.altlora_factor_update(
        xs, grads, [t.clone() for t in moments], seconds, gram, cross, x_gram=x_gram, **kw)
    assert ok_a.tolist() == ok_b.tolist() == [True, True, False, True]
    a, b = 1 - kw["lr"] * kw["weight_decay"], kw["lr"] / kw["bc1"]
    # float64, one step of well-conditioned algebra: the two routes round differently
    for i in range(n):
        assert rel(x_new[i], a * xs[i] - b * d[i] if ok_b[i] else xs[i]) < 1e-14
        assert rel(m_a[i], m_b[i]) < 1e-14
        if plus:
            assert rel(v_a[i], v_b[i]) < 1e-14
    assert torch.equal(m_b[2], moments[2]) and rel(cross_b[2], x_gram[2]) < 1e-15  # the skipped pair
    assert rel(cross_a, cross_b) < 1e-13


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_joint_updates_write_the_factors_in_place(cls, monkeypatch):
    """Joint updates know each factor's Gram (the other half-step's), so the kernel returns
    directions and ``_apply`` writes the parameters in place; alternation forms new factors."""
    pure = altlora_module.altlora_factor_update
    calls = []
    monkeypatch.setattr(altlora_module, "altlora_factor_update",
                        lambda *a, **k: calls.append(k["x_gram"] is not None) or pure(*a, **k))
    for mode, expected in (("joint", [True, True]), ("alternating", [False])):
        calls.clear()
        prob, s = Problem(), 2.0
        A, B = prob.params(s)
        opt = cls(pairs=[(A, B, s)], lr=1e-2, mode=mode)
        prob.backward(A, B, s)
        a0, storage = A.detach().clone(), A.data_ptr()
        opt.step()
        assert calls == expected and A.data_ptr() == storage
        assert not torch.equal(A.detach(), a0)  # B is not zero: A moves first when alternating


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_gram_that_is_not_positive_definite_skips_that_factor(cls):
    """With no ridge and PEFT's B = 0, A's system ``B^T B`` is singular: A is left as it was (and
    counted as skipped), while B's half-step, whose ``A A^T`` is positive definite, goes ahead."""
    prob, s = Problem(b_zero=True), 2.0
    A, B = prob.params(s)
    opt = cls(pairs=[(A, B, s)], lr=1e-2, ridge=0.0, relative_ridge=0.0)
    prob.backward(A, B, s)
    opt.step()
    assert torch.equal(A.detach(), prob.A0)
    assert B.detach().abs().max() > 0 and torch.isfinite(B).all()
    assert opt.stats()["skipped_steps"] == 1


def test_a_skipped_factor_is_left_out_of_the_clipped_norm():
    """B of rank 1 (r = 3) and no ridge: A's system is singular though A's gradient is not zero.
    A is skipped, and the clipped norm is B's full-weight step alone, ``||G Proj_r(A)||``."""
    prob, s = Problem(), 2.0
    A, B = prob.params(s)
    with torch.no_grad():
        B[:, 1:] = 0
    opt = AltLoRA(pairs=[(A, B, s)], lr=1e-2, ridge=0.0, max_grad_norm=1e9)
    G = prob.full_grad(A.detach(), B.detach(), s)
    prob.backward(A, B, s)
    assert A.grad.abs().max() > 0
    a = A.detach().clone()
    expected = (G @ a.T @ torch.linalg.solve(a @ a.T, a)).norm()
    opt.step()
    assert torch.equal(A.detach(), a)
    assert rel(opt.last_grad_norm, expected) < 1e-12  # float64, as the clipping tests


def test_stats_reports_phase_skips_and_gram_conditions():
    model = tiny_peft_llama()
    opt = AltLoRA(model, lr=1e-2, first="B", mode="alternating")
    train(model, opt, 3)
    st = opt.stats()
    assert st["phase"] == "A" and st["skipped_steps"] == 0
    pair = st["groups"][0]["pairs"][0]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    ridge = 1e-6 * torch.eye(4, dtype=DT)
    assert pair["name"].endswith("layers.0.self_attn.q_proj[default]") and pair["scaling"] == 2.0
    # eigenvalue ratios of 4 x 4 float64 Grams with condition numbers below 1e6: two routes agree to 1e-9
    assert pair["cond_BtB"] == pytest.approx(torch.linalg.cond(B.T @ B + ridge).item(), rel=1e-9)
    assert pair["cond_AAt"] == pytest.approx(torch.linalg.cond(A @ A.T + ridge).item(), rel=1e-9)
    assert st["grad_norm"] > 0 and 0 < st["clip_coef"] <= 1


@pytest.mark.parametrize("kwargs,match", [  # the arguments every optimizer has: test_contract.py
    (dict(beta1=1.0), "beta1"),
    (dict(switch_every=0), "switch_every"),
    (dict(first="C"), "first"),
    (dict(mode="gauss"), "mode"),
    (dict(mode="joint", first="B"), "mode='alternating'"),  # joint updates have no order
    (dict(mode="joint", switch_every=2), "mode='alternating'"),
    (dict(convention="authors"), "convention"),
    (dict(ridge=-1e-6), "ridge"),
    (dict(relative_ridge=-1.0), "relative_ridge"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
])
def test_invalid_hyperparameters_are_rejected(kwargs, match):
    prob = Problem()
    A, B = prob.params()
    with pytest.raises(ValueError, match=match):
        AltLoRA(pairs=[(A, B, 2.0)], **kwargs)


def test_altlora_plus_betas_are_validated():
    A, B = Problem().params()
    with pytest.raises(ValueError, match="betas"):
        AltLoRAPlus(pairs=[(A, B, 2.0)], betas=(0.9, -0.1))


def test_non_lora_trainables_are_adamw_updated_exactly_like_torch():
    """The aux group runs AdamW with torch's arithmetic (the lm_head copy here)."""
    model = tiny_peft_llama()
    opt = AltLoRA(model, lr=1e-2, aux_lr=3e-3, aux_weight_decay=0.1, max_grad_norm=0)  # unclipped, as the twin
    aux = [g for g in opt.param_groups if not g["lora"]]
    assert len(aux) == 1 and all("lm_head" in n for n in aux[0]["param_names"])
    head = aux[0]["params"][0]
    twin = torch.nn.Parameter(head.detach().clone())
    ref = torch.optim.AdamW([twin], lr=3e-3, weight_decay=0.1)
    for t in range(3):
        x = batch(t)
        model(input_ids=x, labels=x).loss.backward()
        twin.grad = head.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    assert torch.allclose(head, twin, rtol=0, atol=1e-7)


def test_float64_linalg_option():
    prob = Problem()
    A = torch.nn.Parameter(prob.A0.float())
    B = torch.nn.Parameter(prob.B0.float())
    opt = AltLoRA(pairs=[(A, B, 2.0)], lr=1e-2, linalg_dtype=torch.float64)
    A.grad, B.grad = torch.ones_like(A), torch.ones_like(B)
    opt.step()
    assert opt.state[A]["exp_avg"].dtype == DT and A.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact_for_every_kind_of_entry(dtype):
    """The fast finiteness check (max and sum) must agree with isfinite().all() entry by entry,
    including a finite tensor whose sum overflows and tensors with one NaN, +inf or -inf."""
    from altlora.optim.sharding import all_finite

    def with_entry(value: float) -> torch.Tensor:
        t = torch.randn(5, 7).to(dtype)
        t[2, 3] = value
        return t

    cases = [torch.randn(5, 7).to(dtype), with_entry(float("nan")), with_entry(float("inf")),
             with_entry(-float("inf")), torch.full((5, 7), torch.finfo(dtype).max, dtype=dtype),
             torch.full((5, 7), -torch.finfo(dtype).max, dtype=dtype), torch.zeros(0, 3, dtype=dtype),
             torch.zeros((), dtype=dtype)]
    expected = [bool(torch.isfinite(t).all()) for t in cases]
    assert expected == [True, False, False, False, True, True, True, True]
    assert all_finite(cases).tolist() == expected
