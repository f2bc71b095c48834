"""Calibration sources and the windowing rule (stream -> consecutive non-overlapping windows from token 0)."""
from __future__ import annotations

import json

import pytest
import torch
from pipeline_models import one_thread, tiny_tokenizer  # noqa: F401

from sglp_fast.calibration.text import (
    CalibrationData,
    builtin_text,
    load_calibration,
    load_text,
    tokenize_windows,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_builtin_text_is_deterministic_english_and_portions_are_disjoint():
    calib, held = builtin_text("calib"), builtin_text("heldout")
    builtin_text.cache_clear()
    assert builtin_text("calib") == calib  # regenerated from scratch: identical
    assert len(calib) > 200_000 and len(held) > 50_000
    calib_paras, held_paras = set(calib.split("\n\n")), set(held.split("\n\n"))
    assert not calib_paras & held_paras
    words = calib.split()
    common = sum(w.lower() in {"the", "a", "of", "to", "is", "and", "in"} for w in words)
    assert common / len(words) > 0.1  # English prose, not code
    assert ">>>" not in calib and ">>>" not in held
    with pytest.raises(ValueError, match="portion"):
        builtin_text("train")


def test_windows_are_consecutive_slices_of_the_one_stream():
    tok = tiny_tokenizer()
    text = builtin_text("calib")[:20000]
    full = tok(text)["input_ids"]
    for n, s in ((3, 17), (1, 1), (5, 64), (7, 100)):
        w = tokenize_windows(tok, text, n, s)
        assert w.shape == (n, s) and w.dtype == torch.long
        assert w.flatten().tolist() == full[: n * s]  # window i = stream[i*s:(i+1)*s]


def test_bos_only_when_the_tokenizer_adds_one():
    from transformers import BertTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "b": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    bert_like = BertTokenizerFast(tokenizer_object=t, cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
                                  pad_token="[PAD]")
    w = tokenize_windows(bert_like, "a b " * 50, 2, 4)
    assert w[0].tolist() == [2, 4, 5, 4] and w[1].tolist() == [5, 4, 5, 4]  # [CLS] once, at token 0
    assert tiny_tokenizer()("the")["input_ids"][0] != tiny_tokenizer().eos_token_id  # no BOS added


def test_too_little_text_is_an_error_not_padding():
    with pytest.raises(ValueError, match="fewer than n_seqs\\*seq_len"):
        tokenize_windows(tiny_tokenizer(), "short text", 4, 32)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_seqs"):
            tokenize_windows(tiny_tokenizer(), "text", bad, 4)


def test_sources_file_jsonl_list_tensor(tmp_path):
    tok = tiny_tokenizer()
    para = builtin_text("heldout")[:5000]
    txt = tmp_path / "c.txt"
    txt.write_text(para)
    assert load_text(str(txt)) == para
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(para.split("\n\n"))) + "\n\n")
    assert load_text(str(jl)) == para  # records joined by a blank line = the original paragraphs
    a = load_calibration(str(jl), tok, n_seqs=2, seq_len=16, seed=3)
    b = load_calibration(str(txt), tok, n_seqs=2, seq_len=16)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.provenance() == {"source": str(jl), "n_seqs": 2, "seq_len": 16, "tokens": 32, "seed": 3,
                              "windowing": "consecutive-non-overlapping-from-0"}
    c = load_calibration(para.split("\n\n"), tok, n_seqs=2, seq_len=16)
    assert torch.equal(c.input_ids, a.input_ids)
    ids = torch.arange(12).view(3, 4)
    assert load_calibration(ids, None).input_ids is ids
    d = load_calibration(None, tok, n_seqs=2, seq_len=8)
    assert d.source == "builtin"
    assert [bt["input_ids"].shape for bt in d.batches()] == [(1, 8), (1, 8)]
    assert [bt["input_ids"].shape for bt in CalibrationData(torch.zeros(5, 3, dtype=torch.long), "x").batches(2)] \
        == [(2, 3), (2, 3), (1, 3)]


def test_source_errors_name_the_fix(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="not a file"):
        load_text(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_text(str(bad))
    bad.write_text('{"body": "ok"}\n')
    with pytest.raises(ValueError, match="--text-field"):
        load_text(str(bad))
    assert load_text(str(bad), text_field="body") == "ok"
    with pytest.raises(TypeError, match="source"):
        load_text(3)
    with pytest.raises(ValueError, match="tokenizer"):
        load_calibration("builtin", None)
    with pytest.raises(ValueError, match="int64"):
        load_calibration(torch.zeros(2, 3), tok)


def test_hf_source_without_datasets_or_network_says_so():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the `datasets` package"):
            load_text("hf:wikitext:wikitext-2-raw-v1@test")
    else:  # pragma: no cover - datasets installed: no network here, so the load must fail loudly
        with pytest.raises(ValueError, match="could not load"):
            load_text("hf:no-such-dataset-xyz")
