"""GGUF in, GGUF out (pruning/gguf.py) on the shipped SmolLM2-135M Q4_1 GGUF.

The pruned GGUF must load in transformers and compute what the in-memory pruning computes: exactly for a plan
without compensation (the kept tensors are the same bytes, so the same dequantized weights), and for a
compensated plan exactly up to the requantization of the folded tensors, whose error is bounded per element
by the Q4_1 half step (checked against ``fold_state_tensor`` on the dequantized torch weight).
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
tf = pytest.importorskip("transformers")

from gguf import quants  # noqa: E402

from sglp_fast.models.loading import default_model_path  # noqa: E402
from sglp_fast.plan import Plan, config_fingerprint  # noqa: E402
from sglp_fast.pruning import remove_blocks  # noqa: E402
from sglp_fast.pruning.gguf import write_pruned_gguf  # noqa: E402
from sglp_fast.selection.compensation import fold_state_tensor  # noqa: E402

REMOVED = [3, 13, 14]
ANY_HASH = "sha256:" + "0" * 64  # a config hash no real model has
IDS = torch.tensor([[1, 504, 3458, 282, 260, 2940, 28, 314, 6070, 355, 11270, 30, 2, 17, 99]])


@pytest.fixture(scope="module")
def src_path():
    try:
        return default_model_path()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def src_tensors(src_path):
    return _tensors(src_path)


@pytest.fixture(scope="module")
def src_model(src_path):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_pretrained(str(src_path.parent), gguf_file=src_path.name,
                                                   dtype=torch.float32).eval()


def _plan(model_or_hash, num_blocks=30, removed=REMOVED, transforms=None) -> Plan:
    h = model_or_hash if isinstance(model_or_hash, str) else config_fingerprint(model_or_hash.config)
    extra = {"compensation": {"blocks": sorted(transforms), "alpha": 1.0}} if transforms else {}
    return Plan(model={"id": "smollm2-135m", "num_blocks": num_blocks, "config_hash": h}, calibration={},
                cka=np.eye(num_blocks), segments=[(0, num_blocks - 1)], k=1, k_rule="given", scorer="random",
                scores={"random": [0.0] * num_blocks}, removed=removed,
                budget=None if removed is None else {"remove": len(removed)},
                extra=extra, transforms=transforms)


def _maps(d=576, blocks=(2, 12), scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {b: torch.eye(d, dtype=torch.float64) + scale * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
            for b in blocks}


def _load(path):
    return tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model.double()(IDS).logits


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _source_name(name, removed=REMOVED):
    """The source tensor an output tensor was copied from (kept blocks renumbered 0..)."""
    if not name.startswith("blk."):
        return name
    _, new, rest = name.split(".", 2)
    return f"blk.{[i for i in range(30) if i not in removed][int(new)]}.{rest}"


@pytest.mark.slow  # ~20 s: loads the pruned GGUF in transformers
def test_uncompensated_gguf_equals_in_memory_pruning(src_path, src_model, src_tensors, tmp_path):
    out = tmp_path / "pruned.gguf"
    info = write_pruned_gguf(src_path, _plan(src_model), out)  # default check_config=True: the hash matches
    assert info["block_count"] == 27 and info["removed"] == REMOVED and info["compensated"] == {}
    assert info["output_bytes"] == out.stat().st_size < info["source_bytes"]
    assert info["tensor_types"] == {"Q8_0": 1, "F32": 55, "Q4_1": 189}
    assert sorted(os.listdir(tmp_path)) == ["pruned.gguf"]  # no temporary file left behind

    reader = gguf.GGUFReader(out)
    assert reader.get_field("llama.block_count").contents() == 27
    assert reader.get_field("sglp.removed").contents() == REMOVED
    assert reader.get_field("sglp.source_block_count").contents() == 30
    assert reader.get_field("sglp.compensation.tensor_type") is None
    src_t, out_t = src_tensors, {t.name: t for t in reader.tensors}
    assert {_source_name(n) for n in out_t} == {n for n in src_t if not any(n.startswith(f"blk.{i}.") for i in REMOVED)}
    for name, t in out_t.items():  # byte for byte, same type and shape as the source tensor it came from
        s = src_t[_source_name(name)]
        assert t.tensor_type == s.tensor_type and list(t.shape) == list(s.shape), name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(s.data).view(np.uint8)), name

    want = _logits(remove_blocks(copy.deepcopy(src_model), REMOVED))
    got = _logits(_load(out))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)  # the same dequantized weights


@pytest.mark.slow  # ~25 s: loads the pruned GGUF in transformers
def test_compensated_gguf_folds_like_fold_state_tensor(src_path, src_model, src_tensors, tmp_path):
    """Tolerance, why: the folded ffn_down is requantized to Q4_1 (per 32 values: min m and step d in fp16, 4-bit
    codes), so each weight may move by d/2 plus the fp16 rounding of d and m; every other tensor is the source's
    bytes. The logits then equal exactly those of the in-memory model whose folded weights went through the same
    Q4_1 round trip."""
    T = _maps()
    plan = _plan(src_model, transforms=T)
    out = tmp_path / "comp.gguf"
    info = write_pruned_gguf(src_path, plan, out, check_config=False)
    assert info["compensated"] == {"blk.2.ffn_down.weight": "Q4_1", "blk.11.ffn_down.weight": "Q4_1"}
    reader = gguf.GGUFReader(out)
    assert reader.get_field("sglp.compensation.tensor_type").contents() == "Q4_1"
    assert reader.get_field("sglp.compensation.blocks").contents() == [2, 12]
    out_t, src_t = {t.name: t for t in reader.tensors}, src_tensors
    for name, t in out_t.items():  # only the two folded tensors differ from the source
        if name not in info["compensated"]:
            source = src_t[_source_name(name)]
            assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(source.data).view(np.uint8)), name

    roundtrip = remove_blocks(copy.deepcopy(src_model), REMOVED)
    for old, new in ((2, 2), (12, 11)):
        W = src_model.model.layers[old].mlp.down_proj.weight.detach().double()  # transformers' dequantization
        want = fold_state_tensor("linear", "weight", W, T[old]).numpy()
        t = out_t[f"blk.{new}.ffn_down.weight"]
        got = quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        blocks = np.asarray(t.data).reshape(want.shape[0], -1, 20)  # Q4_1 block: d f16, m f16, 16 bytes of codes
        d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float64)
        m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float64)
        bound = np.repeat(0.5 * d + 16 * d * 2.0**-11 + np.abs(m) * 2.0**-10 + 1e-7, 32, axis=1)
        assert (np.abs(got - want) <= bound).all(), f"block {old}: off by {np.abs(got - want).max()}"
        wrong = T[old].numpy() @ W.numpy()  # the other fold direction: the bound must see it
        assert (np.abs(got - wrong) > bound).mean() > 0.1
        q = quants.quantize(want.astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
        roundtrip.model.layers[new].mlp.down_proj.weight.data = torch.from_numpy(
            quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1).copy())
    torch.testing.assert_close(_logits(_load(out)), _logits(roundtrip), rtol=0, atol=1e-6)


def test_refuses_plans_for_other_models_and_non_gguf_sources(src_path, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="config hash mismatch.*check_config=False"):
        write_pruned_gguf(src_path, _plan(ANY_HASH), out)  # 30 blocks like SmolLM2, another config
    synthetic = _synthetic(tmp_path / "four.gguf")
    with pytest.raises(ValueError, match=r"made for a model with 30 blocks.*has 4 \(llama.block_count\)"):
        write_pruned_gguf(synthetic, _plan(ANY_HASH), out, check_config=False)
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 64)
    with pytest.raises(ValueError, match="not a GGUF file.*sglp apply"):
        write_pruned_gguf(junk, _plan(ANY_HASH), out)
    with pytest.raises(ValueError, match="is not a file"):
        write_pruned_gguf(tmp_path / "missing.gguf", _plan(ANY_HASH), out)
    with pytest.raises(ValueError, match="no 'removed' blocks"):
        write_pruned_gguf(src_path, _plan(ANY_HASH, removed=None), out)
    out.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        write_pruned_gguf(src_path, _plan(ANY_HASH), out)
    with pytest.raises(ValueError, match="is the source file"):
        write_pruned_gguf(synthetic, _plan(ANY_HASH, num_blocks=4, removed=[1]), synthetic, overwrite=True)
    assert out.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["four.gguf", "model.safetensors", "x.gguf"]


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import sglp_fast.pruning.gguf as mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    src = _synthetic(tmp_path / "src.gguf")
    monkeypatch.setattr(mod, "_folded_bytes", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_pruned_gguf(src, _plan(ANY_HASH, num_blocks=4, removed=[2], transforms=_maps(d=8, blocks=(1,))),
                          tmp_path / "y.gguf", check_config=False)
    assert os.listdir(tmp_path) == ["src.gguf"]


# ---------------------------------------------------------------- synthetic GGUFs: fast, every metadata case
def _synthetic(path, arch="llama", L=4, d=8, cols=64, extra=None, seed=0):
    """A tiny GGUF: per block an F32 norm, a Q8_0 ffn_down [d, cols] with an F32 bias; per-layer metadata."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(L)
    w.add_embedding_length(d)
    w.add_key_value(f"{arch}.attention.head_count", list(range(1, L + 1)), gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.INT32)  # per layer
    w.add_key_value(f"{arch}.some_list", list(range(L + 1)), gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.INT32)  # not per layer: another length
    for key, value in (extra or {}).items():
        w.add_uint32(f"{arch}.{key}", value)
    dense = {}
    for i in range(L):
        dense[i] = rng.standard_normal((d, cols)).astype(np.float32)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.full(d, i, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_down.weight", quants.quantize(dense[i], gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_down.bias", rng.standard_normal(d).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_per_layer_metadata_bias_fold_and_q8_0_requantization(tmp_path):
    src = _synthetic(tmp_path / "src.gguf")
    T = _maps(d=8, blocks=(0,), scale=0.5)
    plan = _plan(ANY_HASH, num_blocks=4, removed=[1, 2], transforms=T)
    info = write_pruned_gguf(src, plan, tmp_path / "out.gguf", check_config=False)
    assert info["per_layer_keys"] == ["llama.attention.head_count"]
    assert info["compensated"] == {"blk.0.ffn_down.weight": "Q8_0", "blk.0.ffn_down.bias": "F32"}
    r = gguf.GGUFReader(tmp_path / "out.gguf")
    assert r.get_field("llama.block_count").contents() == 2
    assert r.get_field("llama.attention.head_count").contents() == [1, 4]  # entries of blocks 1, 2 dropped
    assert r.get_field("llama.some_list").contents() == [0, 1, 2, 3, 4]
    assert r.get_field("llama.embedding_length").contents() == 8
    s, o = _tensors(src), {t.name: t for t in r.tensors}
    assert sorted(o) == sorted(["blk.0.attn_norm.weight", "blk.0.ffn_down.weight", "blk.0.ffn_down.bias",
                                "blk.1.attn_norm.weight", "blk.1.ffn_down.weight", "blk.1.ffn_down.bias",
                                "output_norm.weight"])
    assert (np.asarray(o["blk.1.attn_norm.weight"].data) == 3).all()  # block 3 is the new block 1
    W = torch.from_numpy(quants.dequantize(s["blk.0.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q8_0)
                         .astype(np.float64))
    want = fold_state_tensor("linear", "weight", W, T[0]).numpy().astype(np.float32)
    assert np.array_equal(np.asarray(o["blk.0.ffn_down.weight"].data),  # the very bytes of quantizing the fold
                          quants.quantize(want, gguf.GGMLQuantizationType.Q8_0))
    b = torch.from_numpy(np.asarray(s["blk.0.ffn_down.bias"].data).astype(np.float64))
    torch.testing.assert_close(torch.from_numpy(np.asarray(o["blk.0.ffn_down.bias"].data).astype(np.float64)),
                               (b @ T[0]).float().double(), rtol=0, atol=0)  # b <- b T, in F32
    assert not np.array_equal(np.asarray(o["blk.0.ffn_down.bias"].data), np.asarray(s["blk.0.ffn_down.bias"].data))

    info16 = write_pruned_gguf(src, plan, tmp_path / "f16.gguf", requantize=False, check_config=False)
    assert info16["compensated"] == {"blk.0.ffn_down.weight": "F16", "blk.0.ffn_down.bias": "F32"}
    r16 = gguf.GGUFReader(tmp_path / "f16.gguf")
    assert r16.get_field("sglp.compensation.tensor_type").contents() == "F16"
    t16 = next(t for t in r16.tensors if t.name == "blk.0.ffn_down.weight")
    assert t16.tensor_type == gguf.GGMLQuantizationType.F16 and list(t16.shape) == [64, 8]  # ne order
    exact = fold_state_tensor("linear", "weight", W, T[0]).numpy()
    got = np.asarray(t16.data).astype(np.float64)
    assert (np.abs(got - exact) <= 2.0**-11 * np.abs(exact) + 1e-7).all()  # one fp16 rounding per weight
    wrong = T[0].numpy() @ W.numpy()  # the other fold direction is far off
    assert np.abs(got - wrong).max() > 100 * (2.0**-11 * np.abs(exact).max())


def test_synthetic_k_quant_source_is_written_f16_and_says_so(tmp_path):
    """gguf-py dequantizes Q4_K but cannot quantize it: the folded tensor is F16, the metadata says F16."""
    d, cols, q4k = 8, 256, gguf.GGMLQuantizationType.Q4_K
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(d, cols // 256, 144), dtype=np.uint8)  # Q4_K block: d, dmin (f16), 140 bytes
    raw[..., 0:2] = np.full((d, 1), 0.01, dtype=np.float16).view(np.uint8)[:, None, :]
    raw[..., 2:4] = np.full((d, 1), 0.002, dtype=np.float16).view(np.uint8)[:, None, :]
    raw = raw.reshape(d, -1)
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    w.add_block_count(2)
    for i in range(2):
        w.add_tensor(f"blk.{i}.ffn_down.weight", raw, raw_dtype=q4k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    T = _maps(d=d, blocks=(0,))
    info = write_pruned_gguf(tmp_path / "k.gguf", _plan(ANY_HASH, num_blocks=2, removed=[1], transforms=T),
                             tmp_path / "out.gguf", check_config=False)
    assert info["compensated"] == {"blk.0.ffn_down.weight": "F16"}
    r = gguf.GGUFReader(tmp_path / "out.gguf")
    assert r.get_field("sglp.compensation.tensor_type").contents() == "F16"
    dense = quants.dequantize(raw, q4k).astype(np.float64)
    assert np.abs(dense).max() > 0
    exact = fold_state_tensor("linear", "weight", torch.from_numpy(dense), T[0]).numpy()
    got = np.asarray(r.tensors[0].data).astype(np.float64)
    assert (np.abs(got - exact) <= 2.0**-11 * np.abs(exact) + 1e-7).all()


def test_synthetic_fold_in_small_chunks_equals_one_chunk(tmp_path, monkeypatch):
    import sglp_fast.pruning.gguf as mod

    src = _synthetic(tmp_path / "src.gguf", cols=256)
    plan = _plan(ANY_HASH, num_blocks=4, removed=[2], transforms=_maps(d=8, blocks=(1,)))
    write_pruned_gguf(src, plan, tmp_path / "one.gguf", check_config=False)
    monkeypatch.setattr(mod, "_CHUNK_BYTES", 8 * 8 * 40)  # 8 chunks of 32 columns (one Q8_0 block each)
    write_pruned_gguf(src, plan, tmp_path / "many.gguf", check_config=False)
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "many.gguf").read_bytes()


@pytest.mark.parametrize("arch, extra", [("gemma2", {}), ("llama", {"leading_dense_block_count": 1}),
                                         ("llama", {"nextn_predict_layers": 1})])
def test_refuses_files_whose_layers_have_positional_roles(tmp_path, arch, extra):
    src = _synthetic(tmp_path / "src.gguf", arch=arch, extra=extra)
    with pytest.raises(ValueError, match="gives layers roles by their index.*safetensors checkpoint"):
        write_pruned_gguf(src, _plan(ANY_HASH, num_blocks=4, removed=[1]), tmp_path / "o.gguf",
                          check_config=False)
    assert sorted(os.listdir(tmp_path)) == ["src.gguf"]
