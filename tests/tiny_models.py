"""Tiny Llama models (no downloads) and a single-thread fixture for the baseline/method tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).to(dtype)


def token_batch(seed: int, n: int = 4, length: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, length), generator=g)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices: one intra-op thread is faster, and immune to oversubscribed CI hosts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_steps(model, opt, steps: int, start: int = 0, extra_loss=None) -> None:
    """``steps`` optimizer steps on the batches ``token_batch(start ..)``, language-model loss
    (plus ``extra_loss(model)`` if given)."""
    for t in range(start, start + steps):
        x = token_batch(t)
        loss = model(input_ids=x, labels=x).loss
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()


def assert_resumes_exactly(build, make_optimizer, n: int = 3, **train_kw) -> None:
    """Train ``build()`` for 2n steps; train another for n, round-trip model and optimizer state
    through ``torch.save`` / ``torch.load(weights_only=True)`` into a model built from another
    seed, train n more: every trainable tensor must be bitwise the same."""
    import io

    ref = build()
    train_steps(ref, make_optimizer(ref), 2 * n, **train_kw)
    model = build()
    opt = make_optimizer(model)
    train_steps(model, opt, n, **train_kw)
    buf = io.BytesIO()
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items()}, "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = build(seed=7)  # everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt = make_optimizer(resumed)
    opt.load_state_dict(ckpt["optim"])
    train_steps(resumed, opt, n, start=n, **train_kw)
    a = {k: p for k, p in ref.named_parameters() if p.requires_grad}
    b = {k: p for k, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
