"""Data loading, splits, bad data files, answer extraction and classification scores."""

import json

import pytest
from tiny_assets import make_tokenizer, write_cls, write_sft

from altlora.data import DataError, batch_indices, encode_generation, load_task, loss_items, split
from altlora.evaluate import answers_match, classification_scores, extract_answer


def test_split_is_fixed_disjoint_and_sized():
    xs = list(range(100))
    tr, va, te = split(xs, 0.1, 0.2, seed=3)
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert sorted(tr + va + te) == xs
    assert split(xs, 0.1, 0.2, seed=3) == (tr, va, te)
    assert split(xs, 0.1, 0.2, seed=4) != (tr, va, te)
    assert [len(s) for s in split(xs, 5, 7, seed=0)] == [88, 5, 7]  # counts work too


def test_user_files_give_both_task_kinds(tmp_path):
    gen = load_task(str(write_sft(tmp_path / "a.jsonl")), val_size=0.1, test_size=0.1)
    assert gen.kind == "generation" and len(gen.train) == 32 and gen.test[0][1].startswith(" ")
    assert gen.stop == "\n"  # one-line answers: generation is cut at the first newline
    cls = load_task(str(write_cls(tmp_path / "b.csv")), val_size=0.1, test_size=0.1)
    assert cls.kind == "classification" and cls.labels == ["neg", "pos"]
    assert {y for _, y in cls.train} == {0, 1}
    (tmp_path / "c.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n' * 5)
    assert load_task(str(tmp_path / "c.jsonl")).labels == ["0", "1"]


def test_loss_only_on_completion_tokens():
    tok = make_tokenizer()
    ids, labels = encode_generation(tok, "Q: 1+2?\nA:", " 3", max_length=64)
    n_prompt = len("Q: 1+2?\nA:")
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id


def test_loss_items_count_predicted_answer_tokens_or_examples():
    tok = make_tokenizer()
    ids, labels = encode_generation(tok, "Q: 1+2?\nA:", " 3", max_length=64)
    assert loss_items({"input_ids": ids, "labels": labels}) == 3  # " ", "3", eos
    assert loss_items({"input_ids": ids, "labels": 1}) == 1


def test_batch_stream_is_full_seeded_and_covers_every_epoch():
    batches = [batch_indices(k, 10, 4, seed=1) for k in range(5)]  # 20 examples = two epochs
    assert all(len(b) == 4 for b in batches)  # batch 2 crosses the epoch boundary and is still full
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation each epoch
    assert batch_indices(3, 10, 4, seed=1) == batches[3]  # a function of k: resume-safe
    assert batch_indices(0, 10, 4, seed=2) != batches[0]


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"bad\.jsonl line 2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"bad\.jsonl line 2: missing field 'completion'"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n',
     r"bad\.jsonl line 2: field 'prompt' must be a string"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "", "completion": "b"}\n', r"bad\.jsonl line 3: field 'prompt' is empty"),
    ('[1, 2]\n', r"bad\.jsonl line 1: expected a JSON object"),
    ('{"question": "a", "answer": "b"}\n', r"bad\.jsonl line 1: cannot tell the task kind"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', r"label column 'label' has only one class \('x'\)"),
    ('\n\n', r"bad\.jsonl: no examples"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, content, expected):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_task(str(f))


def test_malformed_csv(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("text,label\ngood,pos\nbad,neg,extra\n")
    with pytest.raises(DataError, match=r"bad\.csv line 3: 3 fields, but the header"):
        load_task(str(f))
    f.write_text("text,label\n" + "good,pos\n" * 5)
    with pytest.raises(DataError, match="only one class"):
        load_task(str(f))
    f.write_text("sentence,label\ngood,pos\n")
    with pytest.raises(DataError, match=r"bad\.csv line 2: missing field 'text' \(found: sentence, label\)"):
        load_task(str(f))


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope\.jsonl does not exist"):
        load_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"unknown task 'arithmetik'.*arithmetic, movie-polarity.*Did you mean 'arithmetic'"):
        load_task("arithmetik")
    with pytest.raises(DataError, match="too few"):
        load_task(str(write_sft(tmp_path / "s.jsonl", n=3)), val_size=1, test_size=2)


@pytest.mark.parametrize("text, answer", [
    ("109", "109"), (" 109\n", "109"), ("23 + 45 = 68", "68"), ("so #### 1,200", "1200"),
    ("Natalia sold 48. The answer is 72.", "72"), ("-17", "-17"), ("$3.50 total", "3.50"), ("no idea", "no idea"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answers_match():
    assert answers_match(" 109", " 109") and answers_match("109.0", "109")
    assert answers_match("steps...\n#### 1,200", "#### 1200")
    assert not answers_match("100", "109") and not answers_match("", "109")
    assert answers_match(" Paris.", "paris") and not answers_match("Lyon", "Paris")


def test_classification_scores_accuracy_and_macro_f1():
    s = classification_scores([0, 0, 0, 1], [0, 0, 1, 1], 2)
    assert s["accuracy"] == 0.75
    assert s["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_task_json_roundtrip_of_arithmetic_format(tmp_path):
    # BIG-bench's format is read by the arithmetic task; here the same prompt shape from a user file
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Question: What is {i} plus 1?\nAnswer:", "completion": i + 1}) + "\n"
                         for i in range(10)))
    t = load_task(str(f), val_size=1, test_size=1)
    assert t.kind == "generation" and all(isinstance(a, str) for _, a in t.train)
