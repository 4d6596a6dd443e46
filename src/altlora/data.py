"""Tasks: built-in offline data sets and the user's own files, with fixed seeded splits.

Two kinds of task:

* ``generation``: (prompt, answer) pairs for causal-LM SFT (loss on the answer tokens only),
  scored by exact match on the generated answer;
* ``classification``: (text, label) pairs for sequence classification, scored by accuracy
  and macro F1.

Built-in: ``arithmetic`` (BIG-bench, 2-digit addition and subtraction unless ``subtasks``
says otherwise) and ``movie-polarity`` (Pang & Lee sentence polarity). Any ``.jsonl`` file with
``prompt``/``completion`` fields, or ``.jsonl``/``.csv`` file with ``text``/``label`` fields,
is a task too. Malformed files raise :class:`DataError` naming the file, line and field.
"""

from __future__ import annotations

import csv
import functools
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["BUILTIN_TASKS", "DataError", "TaskData", "load_task", "load_task_for", "split", "features",
           "collate", "encode_generation", "batch_indices", "loss_items", "ARITHMETIC_DEFAULT"]

ARITHMETIC_DEFAULT = ("2_digit_addition", "2_digit_subtraction")
BUILTIN_TASKS = {
    "arithmetic": "BIG-bench arithmetic, generative, exact match (subtasks default: "
                  + ", ".join(ARITHMETIC_DEFAULT) + ")",
    "movie-polarity": "Pang & Lee movie-review sentence polarity, 4,000 sentences, accuracy",
}


class DataError(ValueError):
    """A task name or data file is unusable; the message names the file, line and field."""


@dataclass
class TaskData:
    name: str
    kind: str  # "generation" | "classification"
    train: list
    val: list
    test: list
    labels: list[str] = field(default_factory=list)  # classification: index -> label name
    stop: str | None = None  # generation: cut generated text at this string

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def relabelled(self, known: list[str], source: str) -> "TaskData":
        """The task with label indices in the order of ``known`` (a trained classifier's labels);
        DataError naming the labels ``known`` lacks (the classifier cannot predict them)."""
        unseen = [lab for lab in self.labels if lab not in known]
        if unseen:
            raise DataError(f"{self.name}: label(s) {unseen} were not seen in training ({source} knows "
                            f"{known}); evaluate on data with those labels only, or train with them")
        index = [known.index(lab) for lab in self.labels]
        remap = lambda rows: [(x, index[y]) for x, y in rows]  # noqa: E731
        return replace(self, train=remap(self.train), val=remap(self.val), test=remap(self.test), labels=list(known))


# ----------------------------------------------------------------------------- splitting
def _count(size: float, n: int) -> int:
    k = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
    return max(1, k) if n >= 3 and size > 0 else max(0, k)


def split(examples: list, val_size: float, test_size: float, seed: int) -> tuple[list, list, list]:
    """Shuffle with ``seed`` and cut test, validation, train (sizes: fractions < 1 or counts)."""
    order = list(range(len(examples)))
    if len(order) < 3:
        raise DataError(f"{len(order)} example(s) are too few: a task needs at least 3 (training, validation "
                        "and test); add examples")
    random.Random(seed).shuffle(order)
    n_test, n_val = _count(test_size, len(order)), _count(val_size, len(order))
    if n_test + n_val >= len(order):
        raise DataError(f"{len(order)} examples are too few for {n_val} validation and {n_test} "
                        "test examples plus training data; lower val_size/test_size")
    pick = [examples[i] for i in order]
    return pick[n_test + n_val:], pick[n_test:n_test + n_val], pick[:n_test]


# ----------------------------------------------------------------------------- built-in tasks
def _arithmetic(subtasks: list[str] | None) -> tuple[list, str]:
    from .assets import asset_path

    root = asset_path("arithmetic")
    valid = sorted(p.parent.name for p in root.glob("*/task.json"))
    examples = []
    for sub in subtasks or ARITHMETIC_DEFAULT:
        f = root / sub / "task.json"
        if not f.is_file():
            from .validate import closest
            raise DataError(f"unknown arithmetic subtask {sub!r}; valid: {', '.join(valid)}.{closest(sub, valid)}")
        for e in json.loads(f.read_text())["examples"]:
            target = e["target"] if isinstance(e["target"], str) else e["target"][0]
            examples.append((f"Question: {e['input'].strip()}\nAnswer:", " " + target.strip()))
    return examples, "\n"


def _movie_polarity() -> tuple[list, list[str]]:
    from .assets import asset_path

    f = asset_path("movie-polarity") / "polarity-en-pang&lee2.csv"
    rows = []
    with open(f, encoding="utf-8-sig", newline="") as fh:
        for label, text in csv.reader(fh):
            rows.append((text, 1 if label.strip('\ufeff"') == "1" else 0))
    return rows, ["negative", "positive"]


# ----------------------------------------------------------------------------- user files
def _records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a .jsonl or .csv file."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    out = []
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: empty file (expected a header line such as 'text,label')")
            header = [h.strip() for h in header]
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path} line {line}: {len(row)} fields, but the header "
                                    f"{header} has {len(header)}")
                out.append((line, dict(zip(header, row))))
    elif path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            for line, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {line}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path} line {line}: expected a JSON object, got {type(rec).__name__}")
                out.append((line, rec))
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl (prompt/completion "
                        "or text/label) or .csv (text,label)")
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def _field(path: Path, line: int, rec: dict, name: str, allow_number: bool = False) -> str:
    if name not in rec:
        raise DataError(f"{path} line {line}: missing field {name!r} (found: {', '.join(map(str, rec)) or 'none'})")
    v = rec[name]
    if allow_number and isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise DataError(f"{path} line {line}: field {name!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise DataError(f"{path} line {line}: field {name!r} is empty")
    return v


def _user_file(path: Path, fields: dict[str, str]) -> tuple[str, list, list[str]]:
    records = _records(path)
    first = records[0][1]
    if fields["prompt"] in first or fields["completion"] in first:
        ex = [(_field(path, ln, r, fields["prompt"]), _field(path, ln, r, fields["completion"], True))
              for ln, r in records]
        return "generation", ex, []
    if fields["text"] in first or fields["label"] in first:
        raw = [(_field(path, ln, r, fields["text"]), _field(path, ln, r, fields["label"], True).strip())
               for ln, r in records]
        labels = sorted({lab for _, lab in raw})
        if len(labels) < 2:
            raise DataError(f"{path}: label column {fields['label']!r} has only one class ({labels[0]!r}); "
                            "classification needs at least two")
        index = {lab: i for i, lab in enumerate(labels)}
        return "classification", [(t, index[lab]) for t, lab in raw], labels
    raise DataError(f"{path} line {records[0][0]}: cannot tell the task kind from fields {sorted(first)}; "
                    f"expected {fields['prompt']!r}/{fields['completion']!r} (generation) or "
                    f"{fields['text']!r}/{fields['label']!r} (classification)")


def load_task(name: str, *, subtasks: list[str] | None = None, val_size: float = 0.05,
              test_size: float = 0.15, seed: int = 0, max_train: int | None = None,
              fields: dict[str, str] | None = None) -> TaskData:
    """Load a built-in task or a user file and split it (the split depends on ``seed`` only)."""
    fields = {"prompt": "prompt", "completion": "completion", "text": "text", "label": "label", **(fields or {})}
    labels: list[str] = []
    stop = None
    if name == "arithmetic":
        kind, (examples, stop) = "generation", _arithmetic(subtasks)
    elif name == "movie-polarity":
        kind, (examples, labels) = "classification", _movie_polarity()
    elif Path(name).suffix.lower() in (".jsonl", ".json", ".csv") or Path(name).exists():
        kind, examples, labels = _user_file(Path(name), fields)
        if kind == "generation" and not any("\n" in a.strip() for _, a in examples):
            stop = "\n"  # one-line answers: a base model's run-on text is not part of its answer
    else:
        from .validate import closest
        raise DataError(f"unknown task {name!r}: built-in tasks are {', '.join(BUILTIN_TASKS)}, or give a "
                        f"path to a .jsonl/.csv file.{closest(name, BUILTIN_TASKS)}")
    if subtasks and name != "arithmetic":
        raise DataError(f"subtasks only apply to the arithmetic task, not {name!r}")
    train, val, test = split(examples, val_size, test_size, seed)
    if max_train:
        train = train[:max_train]
    return TaskData(name, kind, train, val, test, labels, stop)


def load_task_for(cfg) -> TaskData:
    """:func:`load_task` with the data settings of a run :class:`~altlora.config.Config`."""
    return load_task(cfg.task, subtasks=cfg.subtasks or None, val_size=cfg.val_size,
                     test_size=cfg.test_size, seed=cfg.data_seed, max_train=cfg.max_train_examples or None,
                     fields={"prompt": cfg.prompt_field, "completion": cfg.completion_field,
                             "text": cfg.text_field, "label": cfg.label_field})


# ----------------------------------------------------------------------------- tensors
def encode_generation(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt+answer+eos and labels that are -100 on the prompt."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        a = a + [tokenizer.eos_token_id]
    ids = (p + a)[:max_length]
    labels = ([-100] * len(p) + a)[:max_length]
    return ids, labels


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows])


def features(task: TaskData, tokenizer, examples: list, max_length: int) -> list[dict[str, Any]]:
    """Pre-tokenised features, one dict per example; batch them with :func:`collate`.

    Generation: ``input_ids`` of prompt + answer + eos with ``labels`` masked (-100) on the
    prompt. Classification: the text's ``input_ids`` and the label index.
    """
    if task.kind == "generation":
        return [dict(zip(("input_ids", "labels"), encode_generation(tokenizer, p, a, max_length)))
                for p, a in examples]
    enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": lab} for ids, (_, lab) in zip(enc["input_ids"], examples)]


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of features into a batch (labels padded with -100)."""
    ids = [f["input_ids"] for f in features]
    batch = {"input_ids": _pad(ids, pad_id),
             "attention_mask": _pad([[1] * len(r) for r in ids], 0)}
    labels = [f["labels"] for f in features]
    batch["labels"] = _pad(labels, -100) if isinstance(labels[0], list) else torch.tensor(labels)
    return batch


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist())


def batch_indices(k: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of batch ``k`` of an endless stream of seeded epoch permutations.

    Every batch is full (a batch that crosses an epoch boundary takes the rest from the next
    permutation), and batch ``k`` depends only on ``(k, n, batch_size, seed)``: a resumed run
    and a run split across processes see the same examples.
    """
    out: list[int] = []
    pos = k * batch_size
    while len(out) < batch_size:
        epoch, i = divmod(pos, n)
        take = _epoch_order(n, seed, epoch)[i:i + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


def loss_items(feature: dict[str, Any]) -> int:
    """How many terms ``feature`` adds to the mean loss: its predicted (unmasked, shifted)
    answer tokens for a causal LM, 1 for a classification example."""
    labels = feature["labels"]
    return sum(t != -100 for t in labels[1:]) if isinstance(labels, list) else 1
