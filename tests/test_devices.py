"""A device named without an index is the current one: a model on cuda:0 asked to run on "cuda" is resident."""
from __future__ import annotations

import pytest
import torch

from pipeline_models import tiny_model

from sglp_fast.calibration.devices import resolve_device
from sglp_fast.calibration.weights import BlockWeights
from sglp_fast.models import get_adapter


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as on a machine with CUDA whose current device is cuda:1 (nothing is allocated there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_cuda_without_an_index_is_the_current_device(two_gpus):
    assert torch.device("cuda:1") != torch.device("cuda")  # why: torch compares them literally
    assert resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device(torch.device("cuda")) == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("meta") == torch.device("meta")


def test_without_cuda_the_name_stays(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cuda") == torch.device("cuda")


def test_block_weights_compare_the_resolved_device(two_gpus, monkeypatch):
    """BlockWeights decides resident vs copy against the resolved device: parameters on the current device
    (here faked by giving the parameters' device check the resolved name) are resident for "cuda"."""
    model = tiny_model("llama", 2)
    adapter = get_adapter(model)
    weights = BlockWeights(adapter, "cuda", None, prefetch=False)
    assert weights.device == torch.device("cuda:1")
    assert weights.mode == "copy"  # the parameters are on the CPU: copied, as before
    monkeypatch.setattr(torch.nn.Parameter, "device", property(lambda self: torch.device("cuda", 1)), raising=False)
    assert BlockWeights(adapter, "cuda", None, prefetch=False).mode == "resident"


# --- the budget caps torch's caching allocator (allocator_cap) ----------------------------------------------
class _FakeAllocator:
    """torch.cuda's cap and counters as on a 100 GiB card holding ``reserved`` bytes before the run."""

    def __init__(self, monkeypatch, reserved: int, fraction: float = 1.0):
        self.fraction, self.calls = fraction, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: type("Props", (), {"total_memory": 100 << 30})())
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: self.fraction)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", self._set)

    def _set(self, fraction, device=None):
        self.calls.append((fraction, torch.device(device)))
        self.fraction = fraction


def test_allocator_cap_is_the_budget_over_what_the_caller_held_and_is_restored(monkeypatch):
    from sglp_fast.calibration.devices import allocator_cap

    fake = _FakeAllocator(monkeypatch, reserved=4 << 30, fraction=0.9)
    with allocator_cap("cuda", 24 << 30):
        assert fake.fraction == pytest.approx(28 / 100), fake.calls  # 4 GiB held + the 24 GiB budget
        with allocator_cap("cuda:0", 80 << 30):  # nested (the fit-only pass inside the search): never looser
            assert fake.fraction == pytest.approx(28 / 100)
        assert fake.fraction == pytest.approx(28 / 100)
    assert fake.fraction == 0.9 and fake.calls[-1] == (0.9, torch.device("cuda:0"))
    with pytest.raises(RuntimeError, match="boom"), allocator_cap("cuda", 1 << 30):
        raise RuntimeError("boom")
    assert fake.fraction == 0.9  # restored when the run fails too


@pytest.mark.parametrize("device,limit", [("cpu", 1 << 30), ("cuda", None), (None, 1 << 30)])
def test_allocator_cap_does_nothing_without_a_gpu_budget(monkeypatch, device, limit):
    from sglp_fast.calibration.devices import allocator_cap

    fake = _FakeAllocator(monkeypatch, reserved=0)
    with allocator_cap(device, limit):
        pass
    assert fake.calls == []


def test_calibrate_and_analyze_run_under_the_cap(monkeypatch):
    """calibrate() enters the cap with its max_device_memory, analyze() with max_memory around the search (the
    device is the CPU here: the calls are recorded, the cap itself is the test above)."""
    import contextlib

    import sglp_fast
    from sglp_fast import api
    from sglp_fast.calibration import runtime

    seen = []

    @contextlib.contextmanager
    def record(device, limit):
        seen.append((str(device), limit))
        yield

    monkeypatch.setattr(runtime, "allocator_cap", record)
    monkeypatch.setattr(api, "allocator_cap", record)
    sglp_fast.analyze(tiny_model("llama", 4), torch.randint(0, 50, (4, 16)), remove=1, calib_seqs=4, seq_len=16,
                      verify_windows=2, compensate=False, max_memory="1GiB", device="cpu").close()
    assert ("cpu", 1 << 30) in seen and len(seen) >= 2 and all(limit == 1 << 30 for _, limit in seen), seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_allocators_reserve_stays_within_max_memory_on_a_gpu():
    """On a real GPU: a budget below what the run would otherwise reserve holds for torch's reserve."""
    from sglp_fast.calibration.devices import allocator_cap

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_reserved()
    with allocator_cap("cuda", 256 << 20):
        for size in (100, 60, 90, 120, 70):  # sizes that do not reuse each other's cached blocks
            x = torch.empty(size << 20, dtype=torch.uint8, device="cuda")
            del x
    assert torch.cuda.max_memory_reserved() - base <= (256 << 20) + (2 << 20), torch.cuda.max_memory_reserved()
