"""What runs at once changes nothing: the next block's weights prefetched in a background thread, and several
windows through a block in one call (``calibrate(prefetch=..., windows_per_call=...)``)."""
from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
import torch

from sglp_fast.calibration import lazy_weights, runtime
from sglp_fast.calibration.runtime import _call_groups, _merged_call, calibrate, default_windows_per_call
from sglp_fast.models import get_adapter, load_model
from sglp_fast.models.base import BlockCall
from tiny_models import FAMILIES, VOCAB, calibrate_recorded, rel, tiny_model


def _assert_identical(a, b):
    (r1, o1), (r2, o2) = a, b
    assert r1.loss == r2.loss
    for name in ("grad_norm", "taylor", "block_influence", "relative_update"):
        np.testing.assert_array_equal(getattr(r1, name), getattr(r2, name))
    assert o1.order == o2.order
    for k in o1.outputs:
        assert torch.equal(o1.outputs[k], o2.outputs[k])


def _same_shape_batches(family: str, n: int = 5, windows: int = 1, seq: int = 9, seed: int = 3, padded=True):
    """``n`` batches of one shape, every one with a mask; the later ones padded (so the masks differ)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        mask = torch.ones(windows, seq, dtype=torch.long)
        if padded and i >= n - 2:
            if family.startswith("bert"):
                mask[0, seq - 1 - i % 3:] = 0
            else:
                mask[0, :1 + i % 3] = 0
        out.append({"input_ids": torch.randint(0, VOCAB, (windows, seq), generator=g), "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def lazy_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefetch") / "ckpt"
    model = tiny_model("llama", layers=5, seed=7)
    model.save_pretrained(path, max_shard_size="30KB")  # blocks span several shard files
    return model, path


# --- several windows per block call ------------------------------------------------------------------------
@pytest.mark.parametrize("family, windows", [(f, 1) for f in FAMILIES] + [("llama", 2), ("bert_mlm", 2)])
def test_grouped_calls_equal_one_call_per_batch_float64(family, windows):
    model = tiny_model(family, layers=3, seed=11, dtype=torch.float64)
    # gemma2 in float64 turns padded rows into NaN whatever the grouping (its masking, not ours): no padding
    batches = _same_shape_batches(family, windows=windows, padded=family != "gemma2")
    one, rec1 = calibrate_recorded(model, batches, windows_per_call=1, gradients=False)
    many, rec4 = calibrate_recorded(model, batches, windows_per_call=4 * windows, gradients=False)
    assert rec1.order == rec4.order
    for k in rec1.outputs:
        assert rel(rec4.outputs[k], rec1.outputs[k]) <= 1e-13, k
    assert abs(many.loss - one.loss) <= 1e-13 * abs(one.loss)
    np.testing.assert_allclose(many.block_influence, one.block_influence, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(many.relative_update, one.relative_update, rtol=1e-12)


def test_grouped_calls_with_gradients_and_kept_inputs():
    model = tiny_model("llama", layers=3, seed=12, dtype=torch.float64)
    batches = _same_shape_batches("llama", n=6)
    one = calibrate(model, batches, windows_per_call=1, keep_inputs=3, gradients=True, progress=False)
    many = calibrate(model, batches, windows_per_call=4, keep_inputs=3, gradients=True, progress=False)
    np.testing.assert_allclose(many.grad_norm, one.grad_norm, rtol=1e-12)
    for layer in range(4):
        for b in range(3):
            assert rel(many.kept_inputs.block_input(layer, b), one.kept_inputs.block_input(layer, b)) <= 1e-13
    one.kept_inputs.close(), many.kept_inputs.close()


def test_call_groups_follow_shape_size_and_the_kept_boundary():
    shapes = [(1, 8), (1, 8), (2, 8), (1, 8), (1, 5), (1, 5), (1, 8)]
    batches = [{"input_ids": torch.zeros(s, dtype=torch.long)} for s in shapes]
    assert _call_groups(batches, 1, 0) == [[i] for i in range(7)]
    assert _call_groups(batches, 4, 0) == [[0, 1, 2], [3], [4, 5], [6]]
    assert _call_groups(batches, 4, 1) == [[0], [1, 2, 3], [4, 5], [6]]  # kept batch 0 alone
    batches[1]["attention_mask"] = torch.ones(1, 8, dtype=torch.long)  # other keys: other calls
    assert _call_groups(batches, 4, 0) == [[0], [1], [2, 3], [4, 5], [6]]


def test_merged_call_broadcasts_shared_arguments_and_refuses_what_cannot_merge():
    rope = torch.randn(1, 4, 8)
    a = BlockCall((), {"pos": rope, "mask": torch.zeros(1, 1, 4, 4), "flag": False})
    b = BlockCall((), {"pos": rope.clone(), "mask": torch.ones(1, 1, 4, 4), "flag": False})
    merged = _merged_call([a, b], [1, 1])
    assert merged.kwargs["pos"] is rope  # equal: one copy, broadcast over the windows
    assert merged.kwargs["mask"].shape == (2, 1, 4, 4)  # per window: concatenated
    assert merged.kwargs["flag"] is False
    assert _merged_call([a, BlockCall((), {**b.kwargs, "flag": True})], [1, 1]) is None
    assert _merged_call([a, BlockCall((), {"pos": rope})], [1, 1]) is None


def test_default_windows_per_call_depends_on_shapes_only_on_cpu():
    model = tiny_model("llama", layers=2)
    adapter = get_adapter(model)
    batches = [{"input_ids": torch.zeros(1, 256, dtype=torch.long)}] * 12
    n = default_windows_per_call(adapter, batches, "cpu", torch.float32, max_device_memory="1KiB")
    assert n == runtime.CPU_TOKENS_PER_CALL // 256  # the 1 KiB budget plays no part on the CPU
    assert default_windows_per_call(adapter, batches[:3], "cpu", torch.float32) == 3  # no more than there are
    small = [{"input_ids": torch.zeros(1, 16, dtype=torch.long)}]
    with pytest.raises(ValueError, match="windows_per_call"):
        calibrate(model, small, windows_per_call=0, progress=False)
    with pytest.raises(TypeError, match="prefetch"):
        calibrate(model, small, prefetch="yes", progress=False)


# --- prefetching the next block's weights ------------------------------------------------------------------
def _tracking_reads(monkeypatch, model):
    """Wrap the lazy block reader: which threads read blocks, and the most blocks whose weights were in memory
    at once (blocks materialized in the skeleton + reads not yet put into it, the one starting included)."""
    blocks = get_adapter(model).blocks
    real_read, real_assign = lazy_weights.read_block, lazy_weights.assign_block
    state = {"threads": set(), "most": 0, "in_flight": 0}
    lock = threading.Lock()

    def note(delta: int) -> None:
        with lock:
            state["in_flight"] += delta
            materialized = sum(1 for b in blocks if any(p.device.type != "meta" for p in b.parameters()))
            state["most"] = max(state["most"], materialized + state["in_flight"])

    def read_block(model, block, *args, **kwargs):
        state["threads"].add(threading.current_thread() is threading.main_thread())
        note(+1)
        return real_read(model, block, *args, **kwargs)

    def assign_block(model, block, tensors):
        real_assign(model, block, tensors)
        note(-1)

    monkeypatch.setattr(lazy_weights, "read_block", read_block)
    monkeypatch.setattr(lazy_weights, "assign_block", assign_block)
    return state


@pytest.mark.parametrize("gradients", [False, True])
def test_prefetch_gives_identical_results_with_at_most_two_blocks(lazy_llama, monkeypatch, gradients):
    model, path = lazy_llama
    batches = _same_shape_batches("llama", n=3, seq=7)
    off_model, _ = load_model(path, lazy=True)
    seen_off = _tracking_reads(monkeypatch, off_model)
    off = calibrate_recorded(off_model, batches, prefetch=False, gradients=gradients, keep_inputs=2)
    assert seen_off["threads"] == {True} and seen_off["most"] == 1
    monkeypatch.undo()
    on_model, _ = load_model(path, lazy=True)
    seen_on = _tracking_reads(monkeypatch, on_model)
    on = calibrate_recorded(on_model, batches, prefetch=True, gradients=gradients, keep_inputs=2)
    assert False in seen_on["threads"], "no block was read by the prefetch thread"
    assert seen_on["most"] == 2  # the current block and the next one, never a third
    _assert_identical(off, on)
    for r in (off[0], on[0]):
        r.kept_inputs.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("sglp-prefetch")]
    # and both equal the in-memory model's numbers (the lazy path's contract)
    _assert_identical(calibrate_recorded(model, batches, gradients=gradients), on)


def test_prefetch_of_copied_blocks_gives_identical_results():
    model = tiny_model("gpt2", layers=3, seed=5)
    batches = _same_shape_batches("gpt2", n=3)
    off = calibrate_recorded(model, batches, dtype=torch.float64, prefetch=False)
    on = calibrate_recorded(model, batches, dtype=torch.float64, prefetch=True)
    _assert_identical(off, on)


def test_an_error_in_the_prefetch_thread_reaches_the_caller(lazy_llama, monkeypatch):
    _, path = lazy_llama
    lazy, _ = load_model(path, lazy=True)
    blocks = get_adapter(lazy).blocks
    real = lazy_weights.read_block

    def failing(model, block, *args, **kwargs):
        if block is blocks[3]:
            raise OSError(5, "Input/output error reading the shard of block 3")
        return real(model, block, *args, **kwargs)

    monkeypatch.setattr(lazy_weights, "read_block", failing)
    with pytest.raises(OSError, match="Input/output error reading the shard of block 3") as info:
        calibrate(lazy, _same_shape_batches("llama", n=2), prefetch=True, progress=False)
    assert any("prefetching block 3" in note for note in getattr(info.value, "__notes__", []))
    assert not [t for t in threading.enumerate() if t.name.startswith("sglp-prefetch")]


def _truncate_a_block_tensor(folder) -> str:
    """Cut the end off a shard whose last tensor belongs to a block past the first: loading still works
    (the embedding, norm and head are intact), reading that block fails. Returns the tensor's name."""
    import json
    import os

    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        last = max(header, key=lambda k: header[k]["data_offsets"][1])
        if last.startswith("model.layers.") and not last.startswith("model.layers.0."):
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) - 16)
            return last
    raise AssertionError("no shard ends with a block tensor")


def test_a_truncated_shard_fails_the_same_with_and_without_prefetch(lazy_llama, tmp_path):
    import shutil

    _, path = lazy_llama
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensor = _truncate_a_block_tensor(broken)
    errors = []
    for prefetch in (False, True):
        lazy, _ = load_model(broken, lazy=True)
        with pytest.raises(ValueError, match="truncated file") as info:
            calibrate(lazy, _same_shape_batches("llama", n=2), prefetch=prefetch, progress=False)
        errors.append(str(info.value))
        assert tensor in errors[-1]
    assert errors[0] == errors[1]


# --- the verified search reads ahead too ---------------------------------------------------------------------
def test_the_verified_search_reads_ahead_and_computes_the_same(lazy_llama, monkeypatch):
    """The search's passes (compensation statistics, plain and cross-fitted losses) announce the block they read
    next: with prefetch on, the reads happen in the prefetch thread, at most two blocks are in memory, and
    every loss and map is bit-identical to the search without it."""
    from sglp_fast.selection.verifier import SkipVerifier  # noqa: PLC0415

    _, path = lazy_llama
    batches = _same_shape_batches("llama", n=4, seq=7)
    plans = [[1], [2, 3], [1, 3]]
    out = {}
    for prefetch in (False, True):
        model, _ = load_model(path, lazy=True)
        res = calibrate(model, batches, gradients=False, keep_inputs=4, prefetch=prefetch, progress=False)
        seen = _tracking_reads(monkeypatch, model)  # from here on: the search's reads only
        ver = SkipVerifier(res.kept_inputs, verify_windows=4, folds=2)
        ver.prepare(plans)
        losses = ver.losses(plans) + ver.losses(plans, compensated=True, all_windows=True)
        maps = [ver.transforms(p) for p in plans]
        ver.close()
        monkeypatch.undo()
        out[prefetch] = (losses, maps, seen)
    (loss_off, maps_off, seen_off), (loss_on, maps_on, seen_on) = out[False], out[True]
    assert seen_off["threads"] == {True} and seen_off["most"] == 1
    assert False in seen_on["threads"], "the search read no block ahead"
    assert seen_on["most"] == 2
    assert loss_off == loss_on
    assert any(maps_off) and [m.keys() for m in maps_off] == [m.keys() for m in maps_on]
    assert all(torch.equal(a[p], b[p]) for a, b in zip(maps_off, maps_on) for p in a)
    assert not [t for t in threading.enumerate() if t.name.startswith("sglp-prefetch")]
