"""Activation cache tiers, lazy safetensors blocks, budgets: offloaded == in-memory, and the errors."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile

import numpy as np
import pytest
import torch

import sglp_fast.calibration.store as offload
from sglp_fast.calibration.runtime import calibrate
from sglp_fast.models import get_adapter, load_model
from sglp_fast.calibration.store import TieredStore
from sglp_fast.sizes import parse_bytes
from sglp_fast.calibration.weights import module_bytes
from tiny_models import calibrate_recorded, tiny_batches, tiny_model


def test_parse_bytes():
    assert parse_bytes(None, "x") is None
    assert parse_bytes(123, "x") == 123
    assert parse_bytes("2GiB", "x") == 2 * 2**30
    assert parse_bytes("1.5 GB", "x") == 1_500_000_000
    assert parse_bytes("512mib", "x") == 512 * 2**20
    with pytest.raises(ValueError, match="max_cpu_memory: cannot parse"):
        parse_bytes("lots", "max_cpu_memory")
    with pytest.raises(ValueError, match="non-negative"):
        parse_bytes(-1, "x")
    with pytest.raises(TypeError, match="x: expected bytes"):
        parse_bytes(1.5, "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64])
def test_cache_roundtrip_every_tier(dtype, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(2, 7, 5, generator=g) * 100).to(dtype) for _ in range(4)]
    one = tensors[0].numel() * tensors[0].element_size()
    cache = TieredStore("cpu", device_budget=0, cpu_budget=2 * one, offload_dir=str(tmp_path))
    for b, t in enumerate(tensors):
        cache.put(3, b, t)
    assert cache.used == {"device": 0, "cpu": 2 * one, "disk": 2 * one}  # first fit: two in RAM, two on disk
    assert len(os.listdir(cache._dir)) == 2
    for b, t in enumerate(tensors):
        got = cache.get(3, b)
        assert got.dtype == dtype and torch.equal(got, t)
    cache.free(3, 2)
    assert cache.used["disk"] == one and len(os.listdir(cache._dir)) == 1
    cache.put(3, 2, tensors[0])  # overwrite-in-place semantics: same key replaced
    assert torch.equal(cache.get(3, 2), tensors[0])
    d = cache._dir
    cache.close()
    assert not os.path.exists(d) and cache.used["disk"] == 0 and cache.peak["disk"] == 2 * one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_store_row_slices_from_memory_and_disk(dtype, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    t = [(torch.randn(37, 5, 3, generator=g) * 100).to(dtype) for _ in range(2)]
    one = t[0].numel() * t[0].element_size()
    store = TieredStore("cpu", 0, one, tmp_path)
    store.put("k", 0, t[0])
    store.put("k", 1, t[1])
    assert (store.tier("k", 0), store.tier("k", 1)) == ("cpu", "disk")
    assert store.bytes_in_memory == one and store.bytes_on_disk == one
    (path,) = [os.path.join(store._dir, f) for f in os.listdir(store._dir)]
    assert os.path.getsize(path) == one  # raw data, no header
    if dtype == torch.bfloat16:  # bf16 travels as its int16 bits
        assert np.array_equal(np.fromfile(path, dtype=np.int16), t[1].view(torch.int16).reshape(-1).numpy())
    maps = []
    real = offload.np.memmap

    def spy(*args, **kwargs):
        maps.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(offload.np, "memmap", spy)
    row = 5 * 3 * t[0].element_size()
    for start, stop in [(0, 1), (5, 17), (36, 37), (0, 37), (4, 4)]:
        for b in (0, 1):
            got = store.rows("k", b, start, stop)
            assert got.dtype == dtype and torch.equal(got, t[b][start:stop])
        if stop > start:  # the disk read mapped exactly the requested rows
            assert maps[-1]["offset"] == start * row and maps[-1]["shape"] == (stop - start, 5, 3)
    assert torch.equal(store.get("k", 1), t[1])
    for b in (0, 1):
        with pytest.raises(IndexError, match=r"rows: \[30, 38\) is outside the 37 rows"):
            store.rows("k", b, 30, 38)
    with store:
        pass
    assert store.used == {"device": 0, "cpu": 0, "disk": 0} and store._dir is None


def test_store_policies_and_budgets(tmp_path):
    x = torch.randn(12, 40)
    nbytes = 12 * 40 * 4
    with pytest.raises(ValueError, match="policy: expected one of"):
        TieredStore.for_policy("gpu", "cpu")
    for policy in ("device", "cpu"):  # memory only: an overflow is an error the caller words
        store = TieredStore.for_policy(policy, "cpu", nbytes, tmp_path)
        store.put(0, 0, x)
        assert store.tier(0, 0) == "cpu" and store.used["cpu"] == nbytes
        with pytest.raises(offload.StoreFullError, match="budgets are full"):
            store.put(1, 0, x)
        assert store.used["cpu"] == nbytes and not store.has(1, 0)
        unbounded = TieredStore.for_policy(policy, "cpu")
        for b in range(5):
            unbounded.put(0, b, x)
        assert unbounded.used == {"device": 0, "cpu": 5 * nbytes, "disk": 0}
    store = TieredStore.for_policy("disk", "cpu")  # no folder given: a private one in the system temp folder
    store.put(0, 0, x)
    assert store.tier(0, 0) == "disk"
    assert os.path.realpath(os.path.dirname(store._dir)) == os.path.realpath(tempfile.gettempdir())
    folder = store._dir
    store.close()
    assert not os.path.exists(folder)
    store = TieredStore.for_policy("auto", "cpu", nbytes, tmp_path)  # first fit: memory, then disk
    store.put(0, 0, x)
    store.put(1, 0, x)
    assert (store.tier(0, 0), store.tier(1, 0)) == ("cpu", "disk")
    assert TieredStore.for_policy("auto", "cpu").budgets["cpu"] > 0  # default: half the free RAM
    store.close()
    with pytest.raises(ValueError, match="offload_dir: the activation cache exceeds"):
        TieredStore("cpu", 0, 0, None).put(0, 0, x)  # the calibration store needs an offload_dir for disk
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < offload.free_memory_bytes("cpu") <= total


def _assert_same(a, b):
    (r1, o1), (r2, o2) = a, b
    assert r1.loss == r2.loss
    np.testing.assert_array_equal(r1.grad_norm, r2.grad_norm)
    np.testing.assert_array_equal(r1.taylor, r2.taylor)
    np.testing.assert_array_equal(r1.block_influence, r2.block_influence)
    assert r1.param_grad_norms == r2.param_grad_norms
    assert o1.order == o2.order
    for k in o1.outputs:
        assert torch.equal(o1.outputs[k], o2.outputs[k])


@pytest.mark.parametrize("family", ["llama", "bert_mlm"])
def test_disk_cache_equals_in_memory(family, tmp_path):
    model = tiny_model(family, layers=3, seed=41)
    batches = tiny_batches(family, seed=42)
    fast = calibrate_recorded(model, batches)
    disk = calibrate_recorded(model, batches, max_cpu_memory=0, offload_dir=tmp_path / "off")
    assert disk[0].cache_peak_bytes["cpu"] == 0 and disk[0].cache_peak_bytes["disk"] > 0
    assert fast[0].cache_peak_bytes["disk"] == 0
    half = calibrate_recorded(model, batches, max_cpu_memory=fast[0].cache_peak_bytes["cpu"] // 2, offload_dir=tmp_path / "off")
    assert half[0].cache_peak_bytes["cpu"] > 0 and half[0].cache_peak_bytes["disk"] > 0
    _assert_same(fast, disk)
    _assert_same(fast, half)
    assert os.listdir(tmp_path / "off") == []  # the cache cleans up after itself


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_lazy_safetensors_equals_in_memory(family, tmp_path):
    model = tiny_model(family, layers=4, seed=43)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="30KB")  # sharded: blocks span shard files
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    # tiny BertModel here has no pooler weights: the lazy loader initializes them and says so
    with pytest.warns(UserWarning, match="pooler") if family == "bert" else contextlib.nullcontext():
        lazy, _ = load_model(tmp_path / "ckpt", lazy=True)
    blocks = get_adapter(lazy).blocks
    assert {p.device.type for p in blocks.parameters()} == {"meta"}
    assert all(p.device.type == "cpu" for n, p in lazy.named_parameters() if ".layer" not in n and ".h." not in n)
    batches = tiny_batches(family, seed=44)
    _assert_same(calibrate_recorded(model, batches), calibrate_recorded(lazy, batches, max_cpu_memory=0, offload_dir=tmp_path / "off"))
    assert {p.device.type for p in blocks.parameters()} == {"meta"}  # blocks freed after use
    # removal re-indexes; the lazy model still reads each kept block's own tensors
    get_adapter(model).remove_blocks([1, 2])
    get_adapter(lazy).remove_blocks([1, 2])
    _assert_same(calibrate_recorded(model, batches), calibrate_recorded(lazy, batches))


def test_lazy_materialize_then_save(tmp_path):
    import transformers as tf

    from sglp_fast.calibration.lazy_weights import materialize

    model = tiny_model("llama", layers=3, seed=45)
    model.save_pretrained(tmp_path / "ckpt")
    lazy, _ = load_model(tmp_path / "ckpt", lazy=True)
    a = get_adapter(lazy)
    a.remove_blocks([0])
    materialize(lazy, a)
    lazy.save_pretrained(tmp_path / "pruned")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert back.config.num_hidden_layers == 2
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_memory_plan_reports_tiers(tmp_path):
    model = tiny_model("llama", layers=3)
    res = calibrate(model, tiny_batches("llama"), max_cpu_memory="1KiB", offload_dir=tmp_path, progress=False)
    plan = res.memory_plan
    assert "memory plan" in plan and "disk" in plan and "budget 1.0 KiB" in plan
    assert "resident" in plan  # weights: fast path


# --- bad offload settings ----------------------------------------------------------------------------------
def test_budget_too_small_without_offload_dir():
    with pytest.raises(ValueError, match="offload_dir: the activation cache needs"):
        calibrate(tiny_model("llama"), tiny_batches("llama"), max_cpu_memory=0, progress=False)


def test_offload_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="offload_dir: .* is not writable"):
        calibrate(tiny_model("llama"), tiny_batches("llama"), max_cpu_memory=0, offload_dir=blocker / "sub",
                  progress=False)
    with pytest.raises(TypeError, match="offload_dir"):
        calibrate(tiny_model("llama"), tiny_batches("llama"), offload_dir=3, progress=False)


def test_offload_dir_full_is_refused_up_front(tmp_path, monkeypatch):
    class Usage:
        total, used, free = 10**9, 10**9 - 100, 100

    monkeypatch.setattr(offload.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ValueError, match=r"offload_dir: .* has 100 B free"):
        calibrate(tiny_model("llama"), tiny_batches("llama"), max_cpu_memory=0, offload_dir=tmp_path, progress=False)


def test_disk_full_while_writing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(offload.np, "memmap", full)
    with pytest.raises(OSError, match="offload_dir: disk full") as err:
        calibrate(tiny_model("llama"), tiny_batches("llama"), max_cpu_memory=0, offload_dir=tmp_path, progress=False)
    assert err.value.errno == errno.ENOSPC
    assert [p for p in os.listdir(tmp_path)] == []  # the partial cache folder was removed


# --- CUDA (skipped without a GPU) --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert_mlm"])
def test_cuda_paths_agree(family, tmp_path):
    """On a GPU: resident fast path == streamed-from-CPU == lazy + pinned/disk tiers (bitwise), and == CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny_model(family, layers=3, seed=46)
    batches = tiny_batches(family, seed=47)
    cpu = calibrate_recorded(model, batches)
    streamed = calibrate_recorded(model, batches, device="cuda")  # blocks copied to the GPU one at a time
    assert all(p.device.type == "cpu" for p in model.parameters())
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="30KB")
    with pytest.warns(UserWarning) if family == "bert" else contextlib.nullcontext():
        lazy, _ = load_model(tmp_path / "ckpt", lazy=True)
    block = max(module_bytes(b) for b in get_adapter(model).blocks)
    # room for the least this run needs only (one block, its gradients, the working set): the whole
    # activation cache goes to disk
    from sglp_fast.calibration.memory import BudgetTooSmall
    with pytest.raises(BudgetTooSmall) as too_small:
        calibrate_recorded(lazy, batches, device="cuda", max_device_memory=block, max_cpu_memory=0, offload_dir=tmp_path / "off")
    tiered = calibrate_recorded(lazy, batches, device="cuda", max_device_memory=too_small.value.least + 1024, max_cpu_memory=0,
                  offload_dir=tmp_path / "off")
    assert tiered[0].cache_peak_bytes["device"] == 0 and tiered[0].cache_peak_bytes["disk"] > 0
    resident = calibrate_recorded(model.cuda(), batches, device="cuda")
    _assert_same(resident, streamed)
    _assert_same(resident, tiered)
    assert resident[0].cache_peak_bytes["device"] > 0
    assert abs(resident[0].loss - cpu[0].loss) <= 1e-5 * cpu[0].loss
    from tiny_models import rel

    assert rel(resident[0].grad_norm, cpu[0].grad_norm) <= 1e-5


@pytest.mark.gpu
def test_cuda_cache_tiers_device_pinned_disk(tmp_path):
    t = [torch.randn(3, 5, 7, device="cuda") for _ in range(3)]
    one = t[0].numel() * 4
    cache = TieredStore("cuda", device_budget=one, cpu_budget=one, offload_dir=str(tmp_path))
    for b, x in enumerate(t):
        cache.put(0, b, x)
    assert cache.used == {"device": one, "cpu": one, "disk": one}
    assert cache._entries[(0, 1)].tensor.is_pinned()
    for b, x in enumerate(t):
        got = cache.get(0, b)
        assert got.device.type == "cuda" and torch.equal(got, x)
    cache.close()
