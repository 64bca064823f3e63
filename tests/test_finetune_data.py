"""leanformer finetune: reading labelled files (CSV / TSV / JSONL), label maps, errors, GLUE loading, metrics."""

from __future__ import annotations

import json
import sys
import types

import pytest

from leanformer.data import DataError
from leanformer.finetune.data import Columns, LabelMap, load_files, load_glue, read_examples, split_examples
from leanformer.finetune.metrics import accuracy, classification_metrics, f1_binary, matthews


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- reading
def test_csv_jsonl_tsv_read_the_same_examples(tmp_path):
    rows = [("a good film", "it was fine", 1), ('said "hi", then left', "", 0), ("multi\nline", "x", 1)]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["label", "text", "text_pair"])
        for t, p, y in rows:
            w.writerow([y, t, p])
    _write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "text_pair": p or None, "label": y}) + "\n"
                                         for t, p, y in rows) + "\n")
    _write(tmp_path / "d.tsv", "text\ttext_pair\tlabel\na good film\tit was fine\t1\n")
    csv_ex, jsonl_ex = read_examples(tmp_path / "d.csv"), read_examples(tmp_path / "d.jsonl")
    assert [(e.text, e.text_pair, str(e.label)) for e in csv_ex] == \
        [(e.text, e.text_pair, str(e.label)) for e in jsonl_ex] == \
        [(t, p or None, str(y)) for t, p, y in rows]
    assert csv_ex[2].where.endswith("line 4")  # a quoted field over two lines: the row starts on line 4
    tsv = read_examples(tmp_path / "d.tsv")
    assert (tsv[0].text, tsv[0].text_pair, tsv[0].label) == ("a good film", "it was fine", "1")


def test_other_column_names(tmp_path):
    _write(tmp_path / "d.csv", "sentence1,sentence2,gold\nA,B,yes\nC,D,no\n")
    ex = read_examples(tmp_path / "d.csv", Columns("sentence1", "sentence2", "gold"))
    assert [(e.text, e.text_pair, e.label) for e in ex] == [("A", "B", "yes"), ("C", "D", "no")]


@pytest.mark.parametrize("name, content, message", [
    ("d.csv", "text,label\nok,1\n,0\n", r"d\.csv, line 3, column 'text': the text is empty"),
    ("d.csv", "text,label\nok,1\nfine,\n", r"d\.csv, line 3, column 'label': the label is missing"),
    ("d.csv", "text,lab\nok,1\n", r"d\.csv, line 1: no column 'label' in the header \(columns: 'text', 'lab'\)"),
    ("d.csv", "text,label\nok,1\na,b,c\n", r"d\.csv, line 3: 3 fields where the header has 2"),
    ("d.csv", "", r"d\.csv is empty"),
    ("d.csv", "text,label\n", r"d\.csv holds no examples"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b" "label": 1}\n',
     r"d\.jsonl, line 2, column 14: not valid JSON \(Expecting ',' delimiter\)"),
    ("d.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', r"d\.jsonl, line 2: expected a JSON object"),
    ("d.jsonl", '{"text": "a"}\n', r"d\.jsonl, line 1: no key 'label' \(keys: 'text'\)"),
    ("d.jsonl", '{"text": 5, "label": 1}\n', r"d\.jsonl, line 1, column 'text': expected a string, got 5"),
    ("d.jsonl", '{"text": "a", "label": 1.5}\n', r"line 1, column 'label': a label is an integer or a string, got 1.5"),
    ("d.jsonl", '{"text": "a", "label": true}\n', r"line 1, column 'label': a label is an integer or a string"),
    ("d.txt", "hello\n", r"d\.txt: unknown file type \.txt; use \.csv, \.tsv or \.jsonl"),
])
def test_bad_input_names_file_line_and_column(tmp_path, name, content, message):
    _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        read_examples(tmp_path / name)


def test_missing_file_and_not_utf8(tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope\.csv does not exist"):
        read_examples(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match=r"bin\.csv: not UTF-8 text"):
        read_examples(tmp_path / "bin.csv")


# ---------------------------------------------------------------------------- labels
def test_integer_labels_keep_their_values_and_strings_are_sorted(tmp_path):
    _write(tmp_path / "t.csv", "text,label\na,2\nb,0\nc, 2\n")
    _write(tmp_path / "v.jsonl", '{"text": "d", "label": 1}\n')
    data = load_files(tmp_path / "t.csv", tmp_path / "v.jsonl")
    assert data.labels.integer and data.labels.names == ["0", "1", "2"]
    assert data.ids("train") == [2, 0, 2] and data.ids("val") == [1]
    _write(tmp_path / "s.csv", "text,label\na,pos\nb,neg\nc,neutral\nd,pos\n")
    data = load_files(tmp_path / "s.csv", tmp_path / "s.csv")
    assert data.labels.names == ["neg", "neutral", "pos"] and data.ids("train") == [2, 0, 1, 2]
    assert LabelMap.from_dict(json.loads(json.dumps(data.labels.to_dict()))) == data.labels


def test_a_validation_label_unseen_in_training_names_its_line(tmp_path):
    _write(tmp_path / "t.csv", "text,label\na,pos\nb,neg\n")
    _write(tmp_path / "v.csv", "text,label\nc,pos\nd,maybe\n")
    with pytest.raises(DataError, match=r"v\.csv, line 3: label 'maybe' is not a label of the training data "
                                        r"\('neg', 'pos'\)"):
        load_files(tmp_path / "t.csv", tmp_path / "v.csv")


def test_one_label_and_negative_labels_are_errors(tmp_path):
    _write(tmp_path / "t.csv", "text,label\na,x\nb,x\nc,x\n")
    with pytest.raises(DataError, match="at least two labels"):
        load_files(tmp_path / "t.csv", tmp_path / "t.csv")
    _write(tmp_path / "n.csv", "text,label\na,-1\nb,0\n")
    with pytest.raises(DataError, match="integer labels must be >= 0"):
        load_files(tmp_path / "n.csv", tmp_path / "n.csv")


def test_held_out_split_is_seeded_and_disjoint(tmp_path):
    _write(tmp_path / "t.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(50)))
    a = load_files(tmp_path / "t.csv", val_fraction=0.2, seed=3)
    b = load_files(tmp_path / "t.csv", val_fraction=0.2, seed=3)
    assert [e.text for e in a.val] == [e.text for e in b.val] and len(a.val) == 10 and len(a.train) == 40
    assert not {e.text for e in a.val} & {e.text for e in a.train}
    with pytest.raises(DataError, match="too few"):
        split_examples(a.val[:1], 0.5, 0)


# ---------------------------------------------------------------------------- GLUE through datasets
def test_glue_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"--task glue/sst2 needs the Hugging Face `datasets` package"):
        load_glue("glue/sst2")
    with pytest.raises(DataError, match=r"not a GLUE classification task; choose one of glue/cola"):
        load_glue("glue/stsb")


class _Split(dict):
    def __init__(self, columns: dict, names: list[str]):
        super().__init__(columns)
        self.features = {"label": types.SimpleNamespace(names=names)}

    def __len__(self):
        return len(next(iter(self.values())))


def test_glue_loading_code_with_a_fake_datasets(monkeypatch):
    calls = []

    def load_dataset(path, name):
        calls.append((path, name))
        if name == "qqp":
            raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")
        names = ["entailment", "neutral", "contradiction"]
        cols = {"premise": ["p1", "p2", "p3"], "hypothesis": ["h1", "h2", "h3"], "label": [0, 2, 1], "idx": [0, 1, 2]}
        return {"train": _Split(cols, names), "validation_matched": _Split(cols, names)}

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_glue("glue/mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert data.labels.names == ["entailment", "neutral", "contradiction"] and data.task == "glue/mnli"
    assert [(e.text, e.text_pair) for e in data.train] == [("p1", "h1"), ("p2", "h2"), ("p3", "h3")]
    assert data.ids("train") == [0, 2, 1] and data.pairs
    with pytest.raises(DataError, match=r"could not load nyu-mll/glue/qqp with `datasets` \(no network"):
        load_glue("qqp")


# ---------------------------------------------------------------------------- metrics
def test_metrics_on_known_cases():
    preds, labels = [1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 1, 1, 0]
    tp, tn, fp, fn = 3, 2, 2, 1
    assert accuracy(preds, labels) == 5 / 8
    assert f1_binary(preds, labels) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    binary = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert matthews(preds, labels) == pytest.approx(binary)
    assert matthews([0, 1, 2, 0], [0, 1, 2, 0]) == pytest.approx(1.0)
    assert matthews([0, 0, 0, 0], [0, 1, 0, 1]) == 0.0  # one predicted class: defined as 0
    assert matthews([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    # multi-class cases worked by hand: s=6, p=t=(2,2,2): (c·6 − 12) / (36 − 12), c = 3 then 4
    assert matthews([0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 0]) == pytest.approx((3 * 6 - 12) / 24)
    assert matthews([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 1]) == pytest.approx((4 * 6 - 12) / 24)
    assert set(classification_metrics(preds, labels, 2)) == {"accuracy", "f1", "mcc"}
    assert "f1" not in classification_metrics([0, 1, 2], [0, 1, 2], 3)
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([0, 1, 1], [0, 1])
