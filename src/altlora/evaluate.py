"""Evaluation: exact match for generation, accuracy/F1 for classification, lm-eval bridge."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from .data import TaskData, collate, features, loss_items

__all__ = ["extract_answer", "answers_match", "evaluate_generation", "evaluate_classification",
           "evaluate_task", "default_max_new_tokens", "classification_scores", "run_lm_eval",
           "headline", "eval_loss", "generate"]

_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*([-+]?\$?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def _as_number(s: str) -> float | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def extract_answer(text: str) -> str:
    """The answer in a generated text: after GSM8K's last '####', else 'The answer is X',
    else the final number, else the stripped text."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    m = _ANSWER_IS.findall(text)
    if m:
        return m[-1].replace(",", "").replace("$", "")
    nums = _NUMBER.findall(text)
    if nums:
        return nums[-1].replace(",", "").replace("$", "")
    return text.strip()


def answers_match(prediction: str, target: str) -> bool:
    """Numeric comparison when the target is a number, else normalised string equality."""
    tgt = extract_answer(target) if _NUMBER.search(target) else target
    t_num = _as_number(tgt)
    if t_num is not None:
        p_num = _as_number(extract_answer(prediction))
        return p_num is not None and abs(p_num - t_num) < 1e-9
    norm = lambda s: " ".join(s.lower().strip().rstrip(".").split())  # noqa: E731
    return norm(prediction) == norm(target)


# Room for a model that restates the question before answering ("69 - 74 = -5"): the base
# model's score is not fair otherwise (SmolLM2 on 2-digit arithmetic: 0.00 with 5 tokens, 0.20
# with 16). A fine-tuned model stops at its end-of-sequence token, so the extra room is free.
_RESTATE_TOKENS = 12


def default_max_new_tokens(tokenizer, examples: list) -> int:
    """Longest answer (in tokens) among ``examples`` plus room to restate the question, capped at 256."""
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in examples)
    return min(longest + _RESTATE_TOKENS, 256)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             stop: str | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at ``stop``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        n = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (n - len(r)) + r for r in ids], device=device)
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in ids], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for row in gen[:, n:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            out.append(text.split(stop)[0] if stop and stop in text else text)
    model.train(was_training)
    return out


def evaluate_generation(model, tokenizer, examples: list, *, max_new_tokens: int, batch_size: int = 64,
                        stop: str | None = None) -> dict[str, Any]:
    preds = generate(model, tokenizer, [p for p, _ in examples], max_new_tokens, batch_size, stop)
    hits = [answers_match(p, a) for p, (_, a) in zip(preds, examples)]
    samples = [{"prompt": q, "target": a.strip(), "prediction": p.strip()}
               for (q, a), p in list(zip(examples, preds))[:5]]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}


def classification_scores(preds: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro F1 (F1 of a class with no predictions and no examples is skipped)."""
    acc = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "f1_macro": sum(f1s) / len(f1s) if f1s else 0.0}


@torch.no_grad()
def evaluate_classification(model, tokenizer, task: TaskData, examples: list, *, max_length: int,
                            batch_size: int = 64) -> dict[str, Any]:
    """Accuracy and macro F1 of the argmax predictions; ``unbalanced`` flags skewed labels
    (then F1 is the number to read)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_labels = task.num_labels
    feats = features(task, tokenizer, examples, max_length)
    preds = []
    for i in range(0, len(feats), batch_size):
        batch = collate(feats[i:i + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        preds += logits.argmax(-1).tolist()
    model.train(was_training)
    labels = [y for _, y in examples]
    counts = [labels.count(c) for c in range(num_labels)]
    out = {**classification_scores(preds, labels, num_labels), "n": len(labels)}
    out["unbalanced"] = max(counts) > 1.5 * max(1, min(counts))
    return out


def evaluate_task(model, tokenizer, task: TaskData, examples: list, cfg) -> dict[str, Any]:
    """Score ``examples`` of ``task`` with the settings in ``cfg`` (max_new_tokens, batch sizes)."""
    if cfg.max_eval_examples:
        examples = examples[:cfg.max_eval_examples]
    if task.kind == "generation":
        n_new = cfg.max_new_tokens or default_max_new_tokens(tokenizer, task.train + task.test)
        return evaluate_generation(model, tokenizer, examples, max_new_tokens=n_new,
                                   batch_size=cfg.eval_batch_size, stop=task.stop)
    return evaluate_classification(model, tokenizer, task, examples, max_length=cfg.max_length,
                                   batch_size=cfg.eval_batch_size)


def headline(result: dict[str, Any]) -> tuple[str, float]:
    """(metric name, value) to print for a result dict."""
    key = "exact_match" if "exact_match" in result else "accuracy"
    return key, result[key]


@torch.no_grad()
def eval_loss(model, feats: list[dict], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per predicted item (answer token, or example) over ``feats``.

    Computed from the logits, so it is the task loss alone (AdaLoRA's model adds an
    orthogonality penalty to any loss it computes) and works on models loaded for inference.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, items = 0.0, 0
    for i in range(0, len(feats), batch_size):
        chunk = feats[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        if labels.dim() == 2:  # causal LM: position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        total += F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum").item()
        items += sum(map(loss_items, chunk))
    model.train(was_training)
    return total / max(items, 1)


class EvalError(RuntimeError):
    """lm-evaluation-harness is missing, or it cannot run the requested task."""


def run_lm_eval(model_path: str, task: str, *, adapter: str | None = None, include_path: str | None = None,
                limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = None) -> dict[str, Any]:
    """Score a model folder (plus an optional PEFT adapter) on an lm-evaluation-harness task.

    Returns the harness's per-task results, keyed ``"<metric>,<filter>"``. Tasks in
    ``include_path`` (task YAMLs, e.g. reading local JSONL files) are found without indexing
    the harness's thousands of built-in tasks; built-in tasks download their data from the
    Hugging Face Hub, so they need internet.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalError("`altlora eval --lm-eval` needs lm-evaluation-harness: pip install 'altlora[eval]' "
                        f"(import failed: {e})") from None
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or task not in manager.all_tasks:
        manager = TaskManager(include_path=include_path)
    if task not in manager.all_tasks:
        from .validate import closest
        raise EvalError(f"lm-evaluation-harness has no task {task!r}"
                        f"{' (also searched ' + include_path + ')' if include_path else ''}."
                        f"{closest(task, manager.all_tasks)}")
    args = f"pretrained={model_path},dtype=float32" + (f",peft={adapter}" if adapter else "")
    res = lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=[task], num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu", task_manager=manager,
    )
    return res["results"]
