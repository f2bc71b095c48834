"""Triton kernels vs their float64 references (interpreter on CPU in CI, compiled on a GPU when present)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sglp_fast.kernels.gram import check_triton_device, gram_panel, gram_panel_ref, interpreter_active
from sglp_fast.kernels.hsic import hsic_accumulate, hsic_accumulate_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a64).all()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(4, 1), (17, 33), (130, 96), (4, 96), (130, 1)])
def test_gram_full_matches_reference(n, d, dtype):
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=g).to(dtype).to(DEVICE)
    out = torch.full((n, n), float("nan"), device=DEVICE)  # poisoned: every element must be written
    k, diag, rowsum = gram_panel(x, out=out)
    k_ref, diag_ref, rowsum_ref = gram_panel_ref(x)  # reference on the same (rounded) inputs
    assert k.data_ptr() == out.data_ptr()
    assert rel(k, k_ref) <= TOL[dtype]
    assert rel(diag, diag_ref) <= TOL[dtype]
    assert rel(rowsum, rowsum_ref) <= TOL[dtype] * 10  # row sums of a zero-diagonal Gram may cancel
    assert bool((k.diagonal() == 0).all())


@pytest.mark.parametrize("row_start,rows", [(0, 1), (5, 17), (113, 17), (1, 129)])
def test_gram_panel_offsets_and_keep_diagonal(row_start, rows):
    x = torch.randn(130, 33, dtype=torch.float32).to(DEVICE)
    for zero_diag in (True, False):
        k, diag, rowsum = gram_panel(x, row_start, rows, zero_diag=zero_diag)
        k_ref, diag_ref, rowsum_ref = gram_panel_ref(x, row_start, rows, zero_diag=zero_diag)
        assert k.shape == (rows, 130)
        assert rel(k, k_ref) <= 1e-5 and rel(diag, diag_ref) <= 1e-5 and rel(rowsum, rowsum_ref) <= 1e-5


def test_gram_strided_input_and_output():
    base = torch.randn(40, 70, device=DEVICE)
    x = base[:, ::2]  # non-unit feature stride
    out_base = torch.full((40, 60), float("nan"), device=DEVICE)
    out = out_base[:, 10:50]  # strided output view
    k, _, rowsum = gram_panel(x, out=out)
    k_ref, _, rowsum_ref = gram_panel_ref(x)
    assert rel(k, k_ref) <= 1e-5 and rel(rowsum, rowsum_ref) <= 1e-5
    assert torch.isnan(out_base[:, :10]).all() and torch.isnan(out_base[:, 50:]).all()  # nothing else touched


@pytest.mark.parametrize("num_layers,m", [(1, 5), (3, 17), (17, 1000), (40, 130)])
def test_hsic_accumulate_matches_reference_and_accumulates(num_layers, m):
    f = torch.randn(num_layers, m, device=DEVICE)
    start = torch.randn(num_layers, num_layers, device=DEVICE)
    out = start.clone()
    hsic_accumulate(f, out=out)
    ref = hsic_accumulate_ref(f) + start.double()
    assert rel(out, ref) <= 1e-5
    again = hsic_accumulate(f)
    assert rel(again, hsic_accumulate_ref(f)) <= 1e-5
    assert rel(again, again.T) <= 1e-6  # mirrored triangle


def test_gram_rejects_bad_input():
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        gram_panel(torch.randn(2, 3, 4, 5, device=DEVICE))
    with pytest.raises(TypeError, match="x: expected dtype"):
        gram_panel(torch.randn(5, 3, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="row_start/rows"):
        gram_panel(torch.randn(5, 3, device=DEVICE), 4, 2)
    with pytest.raises(ValueError, match="out: expected a float32"):
        gram_panel(torch.randn(5, 3, device=DEVICE), out=torch.empty(5, 4, device=DEVICE))
    with pytest.raises(TypeError, match="f: expected float32"):
        hsic_accumulate(torch.randn(3, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="out: expected float32"):
        hsic_accumulate(torch.randn(3, 4, device=DEVICE), out=torch.zeros(2, 2, device=DEVICE))


def test_cpu_tensors_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreter_active()
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        check_triton_device(torch.randn(4, 4), "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_stacked_layers_in_one_launch(dtype):
    x = torch.randn(3, 37, 20).to(dtype).to(DEVICE)
    out = torch.full((3, 17, 37), float("nan"), device=DEVICE)
    k, diag, rowsum = gram_panel(x, 19, 17, out=out)
    k_ref, diag_ref, rowsum_ref = gram_panel_ref(x, 19, 17)
    assert k.shape == (3, 17, 37) and diag.shape == (3, 17) and rowsum.shape == (3, 17)
    assert rel(k, k_ref) <= TOL[dtype] and rel(diag, diag_ref) <= TOL[dtype]
    assert rel(rowsum, rowsum_ref) <= TOL[dtype] * 10


# ------------------------------------------------------------------------------------------ determinism
@pytest.fixture
def reversed_programs(monkeypatch):
    """Run the next launches' programs in reverse grid order (CPU interpreter), or do nothing on a GPU.

    The interpreter runs programs one after another in grid order, so atomics there would add in the same
    order every run and hide nondeterminism; flipping every program id reverses that order, which is what a
    GPU's scheduler may do to atomics between runs."""
    if DEVICE == "cuda" or not interpreter_active():
        return
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.set_grid_idx

    def flipped(x, y, z):
        nx, ny, nz = builder.grid_dim
        original(nx - 1 - x, ny - 1 - y, nz - 1 - z)

    monkeypatch.setattr(builder, "set_grid_idx", flipped)


@pytest.mark.parametrize("num_layers,m", [(3, 1000), (17, 1001), (33, 700)])
def test_hsic_accumulate_is_bit_reproducible(num_layers, m, request):
    """Two runs (the second with the programs in another order) give the same bits: no atomics."""
    g = torch.Generator().manual_seed(num_layers * 7919 + m)
    f = torch.randn(num_layers, m, generator=g).to(DEVICE)
    start = torch.randn(num_layers, num_layers, generator=g).to(DEVICE)
    first = hsic_accumulate(f, out=start.clone())
    request.getfixturevalue("reversed_programs")
    second = hsic_accumulate(f, out=start.clone())
    assert torch.equal(first, second)
    assert rel(first, hsic_accumulate_ref(f) + start.double()) <= 1e-5


@pytest.mark.parametrize("n,d", [(130, 33), (37, 1)])
def test_gram_panel_is_bit_reproducible(n, d, request):
    x = torch.randn(2, n, d, generator=torch.Generator().manual_seed(n + d)).to(DEVICE)
    first = gram_panel(x, 3, n - 5)
    request.getfixturevalue("reversed_programs")
    second = gram_panel(x, 3, n - 5)
    for a, b, ref in zip(first, second, gram_panel_ref(x, 3, n - 5)):
        assert torch.equal(a, b) and rel(a, ref) <= 1e-5


# ------------------------------------------------------------ the top-level folder vs HF's `kernels` package
NO_TRITON_LLAMA = textwrap.dedent(
    """
    import os, sys, tempfile
    sys.modules["triton"] = None  # an environment without triton: `import triton` raises ImportError
    import sglp_fast  # first, as the CLI and the tests do: it keeps kernels/ from shadowing HF's `kernels`
    from sglp_fast.hub_kernels_guard import hub_installed
    import transformers as tf
    from transformers.utils import import_utils

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        back = tf.AutoModelForCausalLM.from_pretrained(d)
    assert type(back).__name__ == "LlamaForCausalLM"
    ours = os.path.realpath("kernels")
    shadow = sys.modules.get("kernels")
    if hub_installed():  # transformers >= 5 requires HF's kernel hub: it must be the module under that name
        assert shadow is not None and not os.path.realpath(shadow.__file__).startswith(ours + os.sep), shadow
    else:  # our folder is not mistaken for HF's kernel hub
        assert not import_utils.is_kernels_available()
        assert shadow is None or not hasattr(shadow, "__version__")
    import sglp_fast.kernels as k  # the installed package imports without triton too ...
    try:
        k.gram_panel  # ... and only its kernels need it
    except ImportError:
        print("OK")
    """
)


def test_top_level_kernels_folder_does_not_break_transformers_without_triton():
    """Python started in the repo root sees ``kernels/`` as top-level ``kernels``, the import name of HF's
    kernel hub: without triton transformers' probe of it used to break AutoModelForCausalLM.from_pretrained,
    and transformers 5.x (which requires the hub) failed to import from it ("cannot import name
    'CUDAProperties'") until sglp_fast.hub_kernels_guard imported the real one first."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.isfile(os.path.join(root, "kernels", "__init__.py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", NO_TRITON_LLAMA], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_kernels_imported_from_our_folder_is_a_clear_error(monkeypatch):
    """If something imported our folder as ``kernels`` before sglp_fast could stop it, and HF's hub is
    installed, the error names the cause and the fix instead of transformers' bare ImportError."""
    import types

    from sglp_fast import hub_kernels_guard

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = types.ModuleType("kernels")
    fake.__file__ = os.path.join(root, "kernels", "__init__.py")
    monkeypatch.setitem(sys.modules, "kernels", fake)
    monkeypatch.setattr(hub_kernels_guard, "hub_installed", lambda: True)
    with pytest.raises(ImportError, match="import sglp_fast before anything imports 'kernels'"):
        hub_kernels_guard.unshadow_hub_kernels()
    monkeypatch.setattr(hub_kernels_guard, "hub_installed", lambda: False)
    hub_kernels_guard.unshadow_hub_kernels()  # without the hub, our folder under that name is harmless
