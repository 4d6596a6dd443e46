"""Fingerprint every optimizer's trajectory, to prove a refactoring changed no arithmetic.

Trains a tiny float64 PEFT Llama (LoRA on q/v/down, rank 1 on down, the lm_head as an AdamW
tensor) for a few steps with every registered optimizer and several option sets, and prints a
SHA-256 of the final trainable tensors and of the optimizer state per case. Bit-identical
behaviour means identical digests *on the same machine and thread count* (other CPUs may round
differently, so the digests are not committed):

  python scripts/trajectory_fingerprint.py > before.json     # on the old code
  python scripts/trajectory_fingerprint.py --compare before.json

A change that is meant to reorder arithmetic (a different BLAS call, fused operations) is
held to round-off instead: save the tensors on the old code and print the largest relative
difference per case on the new one (float64, 7 steps: expect 1e-13 or less):

  python scripts/trajectory_fingerprint.py --save before.pt    # on the old code
  python scripts/trajectory_fingerprint.py --diff before.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import distributed_worker as w  # noqa: E402  (the tiny models and batches of the distributed tests)

import altlora  # noqa: E402

STEPS = 7
#: label -> (registered optimizer, lr, hyperparameters); the distributed tests' cases plus options
CASES = {
    **{label: spec for label, spec in w.CASES.items()},
    "altlora_paper": ("altlora", 0.5, dict(convention="paper")),
    "altlora_released": ("altlora", 1e-2, dict(convention="released_code", weight_decay=0.01)),
    "altlora_plus_bc": ("altlora_plus", 1e-2, dict(bias_correction="both", weight_decay=0.01)),
    "altlora_plus_unbatched": ("altlora_plus", 1e-2, dict(batched=False, max_grad_norm=0.1)),
    "altlora_unbatched": ("altlora", 0.5, dict(batched=False, weight_decay=0.01)),
    "altlora_relative_ridge": ("altlora", 0.5, dict(relative_ridge=1e-2)),
    "altlora_plus_relative_ridge": ("altlora_plus", 1e-2, dict(relative_ridge=1.0)),
    "scaled_adamw_nobc": ("scaled_adamw", 1e-2, dict(correct_bias=False, weight_decay=0.01)),
    "lora_pro_zero_x": ("lora_pro_sgd", 0.5, dict(x_mode="zero")),
}


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if torch.is_tensor(t):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def final_tensors(label: str) -> dict[str, dict[str, torch.Tensor]]:
    """The trainable tensors and the optimizer state after ``STEPS`` steps of one case."""
    name, lr, hp = CASES[label]
    model = w.build_model(label if label in w.CASES else "lora")
    opt = altlora.create_optimizer(model, name, lr=lr, **hp)
    w.train(model, opt, STEPS)
    state = {f"{i}.{k}": v for i, st in enumerate(opt.state_dict()["state"].values()) for k, v in st.items()
             if torch.is_tensor(v)}
    return {"params": {k: v.detach().clone() for k, v in w.trainable(model).items()}, "state": state}


def relative_difference(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
    """max |new - old| / max |old| over the floating-point tensors (integer counters must agree)."""
    worst = 0.0
    for k, ref in old.items():
        if not ref.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(new[k], ref) else float("inf"))
        elif ref.numel():
            scale = ref.abs().max().item() or 1.0
            worst = max(worst, (new[k].to(ref.dtype) - ref).abs().max().item() / scale)
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", help="a JSON written by an earlier run: exit 1 on any difference")
    p.add_argument("--save", help="also write the final tensors of every case to this file")
    p.add_argument("--diff", help="tensors saved by --save: print the largest relative difference per case")
    args = p.parse_args()
    for given in (args.compare, args.diff):
        if given and not Path(given).is_file():
            p.error(f"{given}: no such file (write it first on the old code, see the module docstring)")
    torch.set_num_threads(1)
    tensors = {label: final_tensors(label) for label in CASES}
    if args.save:
        torch.save(tensors, args.save)
    if args.diff:
        old = torch.load(args.diff, weights_only=True)
        for label, parts in tensors.items():
            if label not in old:
                print(f"{label:28s} new case, nothing to compare")
                continue
            print(f"{label:28s} params {relative_difference(parts['params'], old[label]['params']):.1e}  "
                  f"state {relative_difference(parts['state'], old[label]['state']):.1e}")
        return 0
    result = {label: {part: digest(ts) for part, ts in parts.items()} for label, parts in tensors.items()}
    if not args.compare:
        print(json.dumps(result, indent=1))
        return 0
    before = json.loads(Path(args.compare).read_text())
    changed = sorted(k for k in before.keys() | result.keys() if before.get(k) != result.get(k))
    for k in changed:
        print(f"CHANGED {k}: {before.get(k)} -> {result.get(k)}")
    print(f"{len(result) - len(changed)} of {len(result)} cases bit-identical")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
