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
