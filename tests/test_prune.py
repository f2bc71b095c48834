"""Tiny random models end to end: prune -> save -> reload -> generate, against independent references."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from pipeline_models import one_thread, save_tiny, tiny_model, tiny_tokenizer  # noqa: F401
from torch import nn

import sglp_fast
from sglp_fast.plan import Plan
from sglp_fast.pruning import apply_plan, check_output_dir, prune_checkpoint, save_pruned

pytestmark = pytest.mark.usefixtures("one_thread")
CALIB = dict(calib_seqs=4, seq_len=24)


class _Identity(nn.Module):
    """Stands in for a removed decoder layer: returns its hidden-state input untouched."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


def _reference_logits(directory, removed, ids, family, transforms=None):
    """The ORIGINAL checkpoint with the removed layers turned into identities (no re-indexing, no cache),
    and each compensation map T applied to its block's MLP output (a hook: out @ T, no weight folding)."""
    model = tf.AutoModelForCausalLM.from_pretrained(directory).eval()
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    for p, T in (transforms or {}).items():
        proj = layers[p].mlp.c_proj if family == "gpt2" else layers[p].mlp.down_proj
        proj.register_forward_hook(lambda mod, inp, out, T=T: (out.double() @ T.double()).to(out.dtype))
    probe = layers[0](model.get_input_embeddings()(ids[:, :2])) if family == "gpt2" else None
    for i in removed:
        layers[i] = _Identity(isinstance(probe, tuple))
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_prune_save_reload_generate(tmp_path, family):
    src = save_tiny(tmp_path / "src", family, layers=6)
    out = tmp_path / "out"
    res = sglp_fast.prune(str(src), "builtin", remove=2, output=out, **CALIB)
    removed = res.plan.removed
    assert len(removed) == 2 and res.params_after < res.params_before
    assert {"cka.png", "config.json", "model.safetensors", "plan.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # temp dir renamed away

    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no remote code
    assert reloaded.config.num_hidden_layers == 4
    if family == "qwen2":
        assert len(reloaded.config.layer_types) == 4
    ids = torch.randint(0, len(tiny_tokenizer()), (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        in_memory = res.model(ids, use_cache=False).logits
        from_disk = reloaded(ids, use_cache=False).logits
    torch.testing.assert_close(from_disk, in_memory, rtol=0, atol=0)  # same fp32 weights, same math
    reference = _reference_logits(src, removed, ids, family, res.plan.transforms)
    torch.testing.assert_close(in_memory, reference, rtol=1e-5, atol=1e-5)

    prompt = ids[:1, :6]
    with_cache = reloaded.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    without = reloaded.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert with_cache.shape == (1, 16) and torch.equal(with_cache, without)

    tok = tf.AutoTokenizer.from_pretrained(out)
    assert tok("the module")["input_ids"] == tiny_tokenizer()("the module")["input_ids"]
    plan = Plan.load(out / "plan.json")
    assert plan.removed == removed and plan.model["num_blocks"] == 6
    png = (out / "cka.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out / "cka.png").shape[0] > 100


def test_output_dir_refused_unless_overwrite(tmp_path):
    src = save_tiny(tmp_path / "src", "llama", layers=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        sglp_fast.prune(str(src), "builtin", remove=1, output=out, **CALIB)
    assert (out / "keep.txt").read_text() == "user data"
    # --overwrite replaces only an earlier sglp output: a folder of user files is never deleted
    with pytest.raises(ValueError, match="replaces only an earlier sglp output"):
        sglp_fast.prune(str(src), "builtin", remove=1, output=out, overwrite=True, **CALIB)
    assert (out / "keep.txt").read_text() == "user data"
    ours = tmp_path / "ours"
    sglp_fast.prune(str(src), "builtin", remove=1, output=ours, **CALIB)
    (ours / "stale.txt").write_text("left by an earlier run")
    res = sglp_fast.prune(str(src), "builtin", remove=1, output=ours, overwrite=True, **CALIB)
    assert not (ours / "stale.txt").exists() and (ours / "plan.json").is_file()
    assert res.output_dir == str(ours)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty, overwrite=False) == empty  # an empty directory is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match="on the output path.*not a directory"):
        check_output_dir(tmp_path / "file" / "sub", overwrite=True)
    with pytest.raises(ValueError, match="holds the model being read"):
        check_output_dir(tmp_path, overwrite=True, protect=(src,))


def test_failed_save_leaves_nothing_behind(tmp_path):
    src = save_tiny(tmp_path / "src", "llama", layers=4)
    res = sglp_fast.prune(str(src), "builtin", remove=1, **CALIB)

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    out = tmp_path / "out"
    out.mkdir()
    res.plan.save(out / "plan.json")  # an earlier sglp output, which --overwrite may replace
    (out / "old.txt").write_text("previous model")
    with pytest.raises(OSError, match="disk full"):
        save_pruned(res.model, BrokenTokenizer(), res.plan, out, overwrite=True)
    assert (out / "old.txt").read_text() == "previous model"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp dir left


def test_plan_refused_for_another_or_pruned_model(tmp_path):
    src = save_tiny(tmp_path / "src", "llama", layers=6)
    res = sglp_fast.prune(str(src), "builtin", remove=2, **CALIB)
    with pytest.raises(ValueError, match="made for a model with 6 blocks.*has 4"):
        apply_plan(res.model, res.plan)  # already pruned
    other = tiny_model("llama", layers=6)
    other.config.intermediate_size = 64  # same depth, different architecture
    with pytest.raises(ValueError, match="config hash mismatch"):
        apply_plan(other, res.plan)
    with pytest.raises(ValueError, match="no 'removed'"):
        apply_plan(tiny_model("llama", 6), sglp_fast.analyze(str(src), "builtin", **CALIB).plan)
    fresh = tf.AutoModelForCausalLM.from_pretrained(src)
    apply_plan(fresh, res.plan)  # the model it was made for: accepted
    assert len(fresh.model.layers) == 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_checkpoint_pruning_matches_in_memory(tmp_path, family):
    src = save_tiny(tmp_path / "src", family, layers=5)
    res = sglp_fast.prune(str(src), "builtin", remove=2, output=tmp_path / "mem", **CALIB)
    streamed = prune_checkpoint(src, res.plan, tmp_path / "stream", max_shard_bytes=20_000)  # forces shards
    assert (streamed / "model.safetensors.index.json").is_file()
    a = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    b = tf.AutoModelForCausalLM.from_pretrained(streamed).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((streamed / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 3
    assert Plan.load(streamed).removed == res.plan.removed


def test_api_inplace_false_keeps_the_analysed_model(tmp_path):
    src = save_tiny(tmp_path / "src", "llama", layers=5)
    res = sglp_fast.prune(str(src), "builtin", remove=1, inplace=False, **CALIB)
    assert len(res.analysis.model.model.layers) == 5 and len(res.model.model.layers) == 4
    assert np.allclose(res.plan.cka, res.plan.cka.T)


def test_perplexity_builds_no_autograd_graph(tmp_path):
    """Evaluation runs without gradients (a graph over every window would hold all activations)."""
    import warnings

    import transformers as tf

    from sglp_fast.evaluate import perplexity

    model = tf.AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "m", "llama", layers=2))
    assert torch.is_grad_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Converting a tensor with requires_grad=True to a scalar" would raise
        res = perplexity(model, torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0)))
    assert res.tokens == 33 and res.perplexity > 1


def test_streamed_perplexity_keeps_the_runs_budget(tmp_path):
    """--lazy evaluates block by block under the run's --max-memory: below the least it is refused like
    calibration; at the least (the read-ahead of the next block gives way) it gives the unbudgeted number."""
    from sglp_fast.calibration.memory import BudgetTooSmall
    from sglp_fast.evaluate import streamed_perplexity

    model = tiny_model("llama", layers=3, seed=4)
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(2))
    free = streamed_perplexity(model, ids)
    with pytest.raises(BudgetTooSmall) as err:
        streamed_perplexity(model, ids, max_memory="1KiB")
    budgeted = streamed_perplexity(model, ids, max_memory=err.value.least, offload_dir=tmp_path)
    assert budgeted.perplexity == pytest.approx(free.perplexity, rel=1e-6)


def test_prune_lazy_evaluates_under_the_same_budget(tmp_path, monkeypatch):
    """`sglp prune --lazy --max-memory M --offload-dir D`: the perplexity before and after runs under M and D
    too (it used to run unbounded, reading two blocks ahead)."""
    from sglp_fast import evaluate
    from sglp_fast.cli import main

    seen = []
    real = evaluate.streamed_perplexity
    monkeypatch.setattr(evaluate, "streamed_perplexity",
                        lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    path = save_tiny(tmp_path / "m", "llama", layers=4)
    rc = main(["prune", str(path), "--lazy", "--remove", "1", "--calib-seqs", "4", "--seq-len", "16",
               "--eval-seqs", "2", "--max-memory", "2GiB", "--offload-dir", str(tmp_path / "off"),
               "-o", str(tmp_path / "out"), "-q"])
    assert rc == 0 and len(seen) == 2  # before and after
    assert all(kw["max_memory"] == 2 * 2**30 and kw["offload_dir"] == str(tmp_path / "off") for kw in seen)
