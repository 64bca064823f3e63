"""Labelled text for sequence classification: CSV / TSV / JSONL files, or a GLUE task through ``datasets``.

A file holds one example per row (CSV, TSV with a header line) or per line (JSONL, one object each), with
the columns ``text`` (required), ``text_pair`` (optional: the second sentence of MNLI-style tasks) and
``label`` (an integer or a string). Other column names are given by :class:`Columns`.

Labels: when every label of the training and validation files is an integer (``3`` or ``"3"``) the ids are
those integers (``0 .. max``); otherwise every label is a name and the names, sorted, get the ids
``0 .. n-1``. :class:`LabelMap` holds the mapping; it is saved with the fine-tuned model.

Every problem is a one-line :class:`~leanformer.data.DataError` naming the file, the line and the column.
``--task glue/NAME`` loads a GLUE task (``nyu-mll/glue``) with Hugging Face ``datasets``, imported only then.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanformer.data.corpus import DataError

CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass
class Columns:
    """Which column holds the text, the optional second text, and the label."""

    text: str = "text"
    text_pair: str = "text_pair"
    label: str = "label"


@dataclass
class Example:
    """One labelled example; ``label`` as read (an ``int`` or a ``str``), ``where`` = ``file, line N``."""

    text: str
    text_pair: str | None
    label: int | str
    where: str = ""


@dataclass
class GlueTask:
    """A GLUE task: its columns in ``nyu-mll/glue``, label count, validation split and headline metrics."""

    name: str
    text: str
    text_pair: str | None
    num_labels: int
    validation: str = "validation"
    metrics: tuple[str, ...] = ("accuracy",)


# GLUE (Wang et al. 2019): the metrics each task reports. STS-B (regression) is not a classification task.
GLUE_TASKS = {t.name: t for t in (
    GlueTask("cola", "sentence", None, 2, metrics=("mcc",)),
    GlueTask("sst2", "sentence", None, 2),
    GlueTask("mrpc", "sentence1", "sentence2", 2, metrics=("f1", "accuracy")),
    GlueTask("qqp", "question1", "question2", 2, metrics=("f1", "accuracy")),
    GlueTask("mnli", "premise", "hypothesis", 3, validation="validation_matched"),
    GlueTask("qnli", "question", "sentence", 2),
    GlueTask("rte", "sentence1", "sentence2", 2),
    GlueTask("wnli", "sentence1", "sentence2", 2),
)}


@dataclass
class LabelMap:
    """Label names by id (``names[i]`` is the label of id ``i``); integer labels are named by their value."""

    names: list[str]
    integer: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def id_of(self, label: int | str, where: str = "") -> int:
        """The id of a label as read from a file; a label outside the map is a :class:`DataError`."""
        if self.integer:
            value = _as_int(label)
            if value is not None and 0 <= value < len(self.names):
                return value
            raise DataError(f"{where}: label {label!r} is not one of the integer labels 0..{len(self.names) - 1}")
        key = str(label)
        try:
            return self.names.index(key)
        except ValueError:
            shown = ", ".join(repr(n) for n in self.names[:10]) + (" ..." if len(self.names) > 10 else "")
            raise DataError(f"{where}: label {key!r} is not a label of the training data ({shown})") from None

    @classmethod
    def from_labels(cls, labels: list[int | str]) -> LabelMap:
        """Integer ids when every label is an integer (ids = values, 0..max), else sorted names."""
        ints = [_as_int(label) for label in labels]
        if labels and all(v is not None for v in ints):
            if min(ints) < 0:
                raise DataError(f"integer labels must be >= 0 (ids of the classes); found {min(ints)}")
            return cls([str(i) for i in range(max(ints) + 1)], integer=True)
        return cls(sorted({str(label) for label in labels}))

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "integer": self.integer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelMap:
        return cls([str(n) for n in d["names"]], bool(d.get("integer", False)))


@dataclass
class ClassificationData:
    """Training and validation examples with their label map; ``source`` says where they came from."""

    train: list[Example]
    val: list[Example]
    labels: LabelMap
    source: str
    task: str | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    label_ids: dict[str, list[int]] = field(default_factory=dict)

    def ids(self, split: str) -> list[int]:
        """Label ids of ``split`` (``train`` or ``val``)."""
        if split not in self.label_ids:
            examples = self.train if split == "train" else self.val
            self.label_ids[split] = [self.labels.id_of(e.label, e.where) for e in examples]
        return self.label_ids[split]

    @property
    def pairs(self) -> bool:
        return any(e.text_pair is not None for e in self.train)


# ---------------------------------------------------------------------------- reading files
def _as_int(label: Any) -> int | None:
    """``label`` as an int when it is one (``3``, ``"3"``, ``" -1 "``), else None (bools are not ints)."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str):
        s = label.strip()
        if s.lstrip("+-").isdigit():
            return int(s)
    return None


def read_examples(path: str | Path, columns: Columns | None = None) -> list[Example]:
    """The examples of one CSV / TSV / JSONL file (see the module docstring)."""
    columns = columns or Columns()
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        examples = list(_read_csv(path, columns, "\t" if suffix == ".tsv" else ","))
    elif suffix in JSONL_SUFFIXES:
        examples = list(_read_jsonl(path, columns))
    else:
        raise DataError(f"{path}: unknown file type {suffix or '(none)'}; use .csv, .tsv or .jsonl")
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _text(value: Any, where: str, column: str, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and value == "" and not required):
        if required:
            raise DataError(f"{where}, column '{column}': missing")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}, column '{column}': expected a string, got {json.dumps(value)}")
    if required and not value.strip():
        raise DataError(f"{where}, column '{column}': the text is empty")
    return value


def _label(value: Any, where: str, column: str) -> int | str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}, column '{column}': the label is missing")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}, column '{column}': a label is an integer or a string, got {json.dumps(value)}")
    return value.strip() if isinstance(value, str) else value


def _read_csv(path: Path, columns: Columns, delimiter: str) -> Iterator[Example]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty (expected a header line with the columns "
                                f"'{columns.text}' and '{columns.label}')")
            header = [h.strip() for h in header]
            for need in (columns.text, columns.label):
                if need not in header:
                    raise DataError(f"{path}, line 1: no column '{need}' in the header (columns: "
                                    f"{', '.join(repr(h) for h in header)})")
            col = {name: header.index(name) for name in (columns.text, columns.text_pair, columns.label)
                   if name in header}
            start = reader.line_num
            for row in reader:
                where = f"{path}, line {start + 1}"
                start = reader.line_num
                if not row:  # a blank line
                    continue
                if len(row) != len(header):
                    raise DataError(f"{where}: {len(row)} fields where the header has {len(header)} "
                                    f"(a text with a '{delimiter}' needs quotes)")
                pair = row[col[columns.text_pair]] if columns.text_pair in col else None
                yield Example(_text(row[col[columns.text]], where, columns.text, True),
                              _text(pair, where, columns.text_pair, False),
                              _label(row[col[columns.label]], where, columns.label), where)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} of the file)") from None
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: {e}") from None


def _read_jsonl(path: Path, columns: Columns) -> Iterator[Example]:
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}, column {e.colno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object with '{columns.text}' and "
                                    f"'{columns.label}', got {type(record).__name__}")
                for need in (columns.text, columns.label):
                    if need not in record:
                        raise DataError(f"{where}: no key '{need}' (keys: {', '.join(map(repr, record))})")
                yield Example(_text(record[columns.text], where, columns.text, True),
                              _text(record.get(columns.text_pair), where, columns.text_pair, False),
                              _label(record[columns.label], where, columns.label), where)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} of the file)") from None


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random ``val_fraction`` of ``examples`` held out for validation (at least one of each)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in (0, 1)")
    if len(examples) < 2:
        raise DataError(f"{len(examples)} example(s): too few to hold some out for validation; "
                        "give a validation file")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [examples[i] for i in keep], [examples[i] for i in val]


def load_files(train: str | Path, validation: str | Path | None = None, columns: Columns | None = None,
               val_fraction: float = 0.1, seed: int = 0) -> ClassificationData:
    """Training (and validation) files → :class:`ClassificationData`; without a validation file a seeded
    ``val_fraction`` of the training file is held out."""
    train_ex = read_examples(train, columns)
    if validation is not None:
        val_ex = read_examples(validation, columns)
        source = f"{train} (validation: {validation})"
    else:
        train_ex, val_ex = split_examples(train_ex, val_fraction, seed)
        source = f"{train} ({len(val_ex)} held out for validation, seed {seed})"
    labels = LabelMap.from_labels([e.label for e in train_ex + val_ex])
    if not labels.integer:  # string labels: the map comes from the training data alone
        labels = LabelMap.from_labels([e.label for e in train_ex])
    data = ClassificationData(train_ex, val_ex, labels, source)
    data.ids("train"), data.ids("val")  # a validation label unseen in training: an error now, naming its line
    if labels.num_labels < 2:
        raise DataError(f"{train}: every example has the label {labels.names[0]!r}; classification needs "
                        "at least two labels")
    return data


# ---------------------------------------------------------------------------- GLUE through `datasets`
def _dataset_errors(datasets: Any) -> tuple[type[BaseException], ...]:
    """``datasets``' own "not found / cannot reach the hub" exception types (where this version has them)."""
    exceptions = getattr(datasets, "exceptions", None)
    names = ("DatasetNotFoundError", "DataFilesNotFoundError")
    return tuple(t for t in (getattr(exceptions, n, None) for n in names) if isinstance(t, type))


def load_glue(task: str, max_train: int | None = None, seed: int = 0) -> ClassificationData:
    """A GLUE task (``glue/sst2`` or ``sst2``) from the Hugging Face hub (``nyu-mll/glue``) with
    ``datasets``: its train and validation splits (MNLI: validation_matched), labels named as GLUE names
    them. ``max_train`` keeps a seeded random subset of the training split."""
    name = task.split("/", 1)[1] if task.startswith("glue/") else task
    spec = GLUE_TASKS.get(name)
    if spec is None:
        raise DataError(f"--task {task!r} is not a GLUE classification task; choose one of "
                        f"{', '.join('glue/' + t for t in GLUE_TASKS)} (STS-B is regression, not supported)")
    try:
        import datasets
    except ImportError:
        raise DataError(f"--task {task} needs the Hugging Face `datasets` package: pip install datasets "
                        "(or pip install 'leanformer[finetune]'), or give --train/--validation files") from None
    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.name)
    except (ConnectionError, OSError, ValueError, *_dataset_errors(datasets)) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"--task {task}: could not load nyu-mll/glue/{spec.name} with `datasets` (no network, "
                        f"or not in the local cache?): {first}") from None
    names = list(ds["train"].features["label"].names)

    def examples(split: str) -> list[Example]:
        rows = ds[split]
        pairs = rows[spec.text_pair] if spec.text_pair else [None] * len(rows)
        return [Example(t, p, names[y], f"glue/{spec.name} {split} row {i}")
                for i, (t, p, y) in enumerate(zip(rows[spec.text], pairs, rows["label"]))]

    train = examples("train")
    if max_train is not None and max_train < len(train):
        train = random.Random(seed).sample(train, max_train)
    data = ClassificationData(train, examples(spec.validation), LabelMap(names), f"nyu-mll/glue {spec.name}",
                              task=f"glue/{spec.name}", metrics=spec.metrics)
    return data
