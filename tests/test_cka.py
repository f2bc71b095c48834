"""CKAAccumulator vs a plain float64 numpy reference written from the formulas; invariances; errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sglp_fast.similarity.accumulator import CKAAccumulator, cka_matrix

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


# ------------------------------------------------------------------ the reference (pairwise, n×n centering)
def ref_kernel(x: np.ndarray, kernel: str) -> np.ndarray:
    x = x.astype(np.float64)
    k = x @ x.T
    if kernel == "linear":
        return k
    sq = np.diag(k)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * k, 0.0)
    np.fill_diagonal(dist2, 0.0)
    pairs = np.sort(dist2[np.triu_indices(len(x), 1)])
    sigma2 = pairs[(len(pairs) - 1) // 2]  # lower median of the off-diagonal squared distances
    return np.exp(-dist2 / (2 * sigma2))


def ref_hsic(k: np.ndarray, l: np.ndarray, estimator: str) -> float:
    n = len(k)
    if estimator == "biased":
        h = np.eye(n) - np.ones((n, n)) / n
        return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    return float(np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def ref_cka(batches, estimator="unbiased", kernel="linear") -> np.ndarray:
    num_layers = len(batches[0])
    h = np.zeros((num_layers, num_layers))
    for batch in batches:
        ks = [ref_kernel(x.double().cpu().numpy(), kernel) for x in batch]
        for i in range(num_layers):
            for j in range(num_layers):
                h[i, j] += ref_hsic(ks[i], ks[j], estimator)
    d = np.sqrt(np.diag(h))
    return h / np.outer(d, d)


def make_batches(num_batches, num_layers, n, d, seed, dtype=torch.float32, offset=1.0):
    """Correlated layers (a random walk through linear maps) with a non-zero mean, like real hidden states."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        x = torch.randn(n, d, generator=g)
        layers = []
        for _ in range(num_layers):
            x = torch.tanh(x @ torch.randn(d, d, generator=g) / d**0.5) + 0.5 * x \
                + 0.3 * torch.randn(n, d, generator=g)
            layers.append((x + offset).to(dtype))
        out.append(layers)
    return out


def run(batches, order="batch", device=DEVICE, **kwargs):
    acc = CKAAccumulator(num_layers=len(batches[0]), device=device, **kwargs)
    if order == "batch":
        for b in batches:
            acc.update([x.to(device) for x in b])
    else:
        for layer in range(len(batches[0])):
            for b_id, b in enumerate(batches):
                acc.update_layer(layer, b[layer].to(device), b_id)
    return acc


# --------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("kernel,space", [("linear", "gram"), ("linear", "feature"), ("rbf", "gram")])
@pytest.mark.parametrize("order", ["batch", "layer"])
def test_matches_numpy_reference(backend, estimator, kernel, space, order):
    batches = make_batches(2, 4, 37, 9, seed=hash((backend, estimator, kernel, space, order)) % 2**31)
    acc = run(batches, order, estimator=estimator, kernel=kernel, space=space, backend=backend, panel_rows=10)
    ours = acc.result()
    ref = ref_cka(batches, estimator, kernel)
    assert ours.dtype == np.float64 and ours.shape == (4, 4)
    assert np.abs(ours - ref).max() <= 1e-6
    assert np.allclose(ours, ours.T, atol=0) and np.all(np.diag(ours) == 1.0)
    assert np.abs(ref - np.eye(4)).max() > 0.05  # the layers really differ: the comparison can fail


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", [(4, 1), (17, 33), (130, 5)])
def test_awkward_shapes_match_reference(backend, n, d):
    batches = make_batches(1, 3, n, d, seed=n * 7 + d)
    for estimator in ("unbiased", "biased"):
        ours = run(batches, estimator=estimator, backend=backend, panel_rows=7).result()
        assert np.abs(ours - ref_cka(batches, estimator)).max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs(dtype, backend):
    batches = make_batches(2, 3, 40, 24, seed=3, dtype=dtype)
    ours = run(batches, backend=backend).result()
    ref = ref_cka(batches)  # reference on the same rounded inputs
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-2


def test_torch_float64_compute_is_exact():
    batches = make_batches(2, 3, 25, 6, seed=4, dtype=torch.float64)
    for kernel in ("linear", "rbf"):
        ours = run(batches, backend="torch", dtype=torch.float64, kernel=kernel).result()
        assert np.abs(ours - ref_cka(batches, kernel=kernel)).max() <= 1e-12


# ---------------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_identical_layers_give_one(kernel):
    x = torch.randn(30, 8) + 3.0
    acc = CKAAccumulator(num_layers=3, kernel=kernel, backend="torch")
    acc.update([x, x.clone(), x * 1.0])
    assert np.abs(acc.result() - 1.0).max() <= 1e-6


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_orthogonal_and_isotropic_scaling_invariance(kernel, estimator):
    (layers,) = make_batches(1, 3, 50, 12, seed=11)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    moved = [layers[0], (layers[1].double() @ q * 7.5).float(), layers[2] * 0.01]
    a = run([layers], estimator=estimator, kernel=kernel, backend="torch").result()
    b = run([moved], estimator=estimator, kernel=kernel, backend="torch").result()
    assert np.abs(a - b).max() <= 1e-5
    c = run([[layers[0], layers[1] * torch.linspace(0.1, 3, 12), layers[2]]], kernel=kernel,
            backend="torch").result()
    assert np.abs(a - c).max() > 1e-3  # anisotropic scaling does change CKA: the check can fail


@pytest.mark.parametrize("space", ["gram", "feature"])
def test_streaming_merge_one_shot_and_orders_agree(space):
    batches = make_batches(4, 5, 23, 7, seed=21)
    kw = dict(backend="torch", space=space, dtype=torch.float64)  # exact algebra: fp64 so 1e-9 is fair
    streamed = run(batches, **kw)
    layer_major = run(batches, "layer", **kw)
    first, second = run(batches[:2], **kw), run(batches[2:], "layer", **kw)
    merged = first.merge(second)
    one_shot = cka_matrix(batches, **kw)
    for other in (layer_major.result(), merged.result(), one_shot):
        assert np.abs(streamed.result() - other).max() <= 1e-9
    assert np.abs(streamed.hsic() - merged.hsic()).max() <= 1e-9 * np.abs(streamed.hsic()).max()
    assert merged.num_batches == 4 and merged.num_tokens == 4 * 23
    # streaming sums HSIC over batches: not the CKA of one big batch (the estimator really is minibatch)
    big = run([[torch.cat([b[l] for b in batches]) for l in range(5)]], **kw).result()
    assert np.abs(big - streamed.result()).max() > 1e-6


def test_gram_and_feature_space_agree():
    batches = make_batches(2, 4, 33, 5, seed=5)
    for estimator in ("unbiased", "biased"):
        a = run(batches, estimator=estimator, space="gram", backend="torch").result()
        b = run(batches, estimator=estimator, space="feature", backend="torch").result()
        assert np.abs(a - b).max() <= 1e-6


def test_layer_major_any_layer_order_and_interleaved_batches():
    batches = make_batches(3, 4, 20, 30, seed=8)  # n < d: Gram space, cached Grams
    acc = CKAAccumulator(num_layers=4, backend="torch")
    order = [(2, 1), (0, 0), (3, 1), (1, 2), (0, 1), (3, 0), (1, 1), (2, 0), (0, 2), (1, 0), (3, 2), (2, 2)]
    for layer, b in order:
        acc.update_layer(layer, batches[b][layer], batch_id=f"b{b}")
    assert acc.pending_batches == {}
    assert np.abs(acc.result() - ref_cka(batches)).max() <= 1e-6


def test_masks_select_tokens():
    g = torch.Generator().manual_seed(2)
    full = [torch.randn(2, 9, 6, generator=g) for _ in range(3)]
    mask = torch.rand(2, 9, generator=g) > 0.3
    mask[:, :3] = True
    acc = CKAAccumulator(num_layers=3, backend="torch")
    acc.update(full, mask=mask)
    acc_layer = CKAAccumulator(num_layers=3, backend="torch")
    for layer in (1, 0, 2):
        acc_layer.update_layer(layer, full[layer], 0, mask=mask.int())
    selected = [[x[mask] for x in full]]
    assert np.abs(acc.result() - ref_cka(selected)).max() <= 1e-6
    assert np.abs(acc_layer.result() - ref_cka(selected)).max() <= 1e-6
    one_shot = cka_matrix([full, full], masks=[mask, None], backend="torch")
    assert np.abs(one_shot - ref_cka([selected[0], [x.reshape(-1, 6) for x in full]])).max() <= 1e-6


def test_state_dict_round_trip_and_resume():
    batches = make_batches(3, 3, 15, 4, seed=9)
    full = run(batches, backend="torch", dtype=torch.float64)
    part = run(batches[:2], backend="torch", dtype=torch.float64)
    resumed = CKAAccumulator(num_layers=3, backend="torch", dtype=torch.float64, device=DEVICE)
    resumed.load_state_dict(part.state_dict())
    resumed.update([x.to(DEVICE) for x in batches[2]])
    assert np.abs(resumed.hsic() - full.hsic()).max() <= 1e-12 * np.abs(full.hsic()).max()
    assert resumed.num_batches == 3
    with pytest.raises(ValueError, match="estimator"):
        CKAAccumulator(num_layers=3, estimator="biased").load_state_dict(part.state_dict())


@pytest.mark.parametrize("tier", ["device", "cpu", "disk", "auto"])
def test_cache_tiers_give_the_same_numbers(tier, tmp_path):
    batches = make_batches(2, 3, 12, 40, seed=10, dtype=torch.bfloat16)  # n < d: Grams cached
    ref = run(batches, "layer", backend="torch", cache="device").hsic()
    budget = 12 * 12 * 4 * 2 if tier == "auto" else None  # auto: two items in memory, the rest on disk
    acc = run(batches, "layer", backend="torch", cache=tier, cache_dir=str(tmp_path),
              cache_budget_bytes=budget)
    assert np.array_equal(acc.hsic(), ref)
    assert acc._store.bytes_in_memory == 0 and acc._store.bytes_on_disk == 0  # freed after each batch
    if tier in ("disk", "auto"):
        assert not any(tmp_path.rglob("*.bin"))


def test_auto_cache_spills_to_disk_under_budget(tmp_path):
    acc = CKAAccumulator(num_layers=3, backend="torch", cache="auto", cache_dir=str(tmp_path),
                         cache_budget_bytes=12 * 12 * 4)
    xs = [torch.randn(12, 40) for _ in range(3)]
    acc.update_layer(0, xs[0], 0)
    acc.update_layer(1, xs[1], 0)
    assert acc._store.bytes_in_memory == 12 * 12 * 4 and acc._store.bytes_on_disk == 12 * 12 * 4
    assert len(list(tmp_path.rglob("*.bin"))) == 1


def test_device_cache_budget_exceeded_says_how_to_fix():
    acc = CKAAccumulator(num_layers=2, backend="torch", cache="device", cache_budget_bytes=100)
    with pytest.raises(ValueError, match="cache_budget_bytes.*cache='auto'"):
        acc.update_layer(0, torch.randn(12, 40), 0)


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    acc = CKAAccumulator(num_layers=2, backend="torch")
    with pytest.raises(ValueError, match="n >= 4"):
        acc.update([torch.randn(3, 5), torch.randn(3, 5)])
    CKAAccumulator(num_layers=2, estimator="biased").update([torch.randn(3, 5), torch.randn(3, 5)])
    with pytest.raises(ValueError, match=r"batch\[1\]: has 6 tokens"):
        acc.update([torch.randn(5, 5), torch.randn(6, 5)])
    with pytest.raises(ValueError, match="expected 2 layer outputs"):
        acc.update([torch.randn(5, 5)])
    bad = torch.randn(6, 5)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1 \(batch\[1\]\): contains NaN or inf"):
        acc.update([torch.randn(6, 5), bad])
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="layer 1 of batch 7: contains NaN or inf"):
        acc.update_layer(1, bad, 7)
    with pytest.raises(ValueError, match=r"layer 1 \(batch\[1\]\): has zero variance"):
        acc.update([torch.randn(6, 5), torch.ones(6, 5) * 3.0])
    with pytest.raises(ValueError, match="mask: expected shape"):
        acc.update([torch.randn(2, 4, 5)] * 2, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_layers"):
        CKAAccumulator(num_layers=0)
    with pytest.raises(ValueError, match="estimator"):
        CKAAccumulator(num_layers=2, estimator="debiased")
    with pytest.raises(TypeError, match="dtype"):
        CKAAccumulator(num_layers=2, dtype=torch.float16)
    with pytest.raises(ValueError, match="space.*RBF"):
        CKAAccumulator(num_layers=2, kernel="rbf", space="feature").update([torch.randn(6, 5)] * 2)


def test_layer_major_errors_and_incomplete_batches():
    acc = CKAAccumulator(num_layers=3, backend="torch")
    acc.update_layer(0, torch.randn(8, 4), "a")
    with pytest.raises(ValueError, match="already given"):
        acc.update_layer(0, torch.randn(8, 4), "a")
    with pytest.raises(ValueError, match="has 9 tokens but earlier layers"):
        acc.update_layer(1, torch.randn(9, 4), "a")
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 3\)"):
        acc.update_layer(3, torch.randn(8, 4), "a")
    with pytest.raises(ValueError, match="still miss layers"):
        acc.result()
    assert acc.pending_batches == {"a": [1, 2]}
    acc.update_layer(1, torch.randn(8, 4), "a")
    acc.update_layer(2, torch.randn(8, 4), "a")
    acc.result()
    with pytest.raises(ValueError, match="already has all 3 layers"):
        acc.update_layer(0, torch.randn(8, 4), "a")


def test_zero_self_hsic_names_the_layer():
    acc = CKAAccumulator(num_layers=2, backend="torch")
    x = torch.randn(6, 3)
    acc._hsic[:] = 1.0
    acc._hsic[1, 1] = 0.0
    acc.num_batches = 1
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\]"):
        acc.result()
    acc2 = CKAAccumulator(num_layers=2, backend="torch")
    acc2.update([x, x])
    assert np.allclose(acc2.result(), 1.0)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' needs a CUDA device"):
        CKAAccumulator(num_layers=2, backend="triton", device="cpu")


def test_auto_backend_uses_torch_on_cpu():
    from sglp_fast.similarity.accumulator import _resolve_backend

    assert _resolve_backend("auto", torch.device("cpu")) == "torch"
    assert _resolve_backend("auto", torch.device("cuda", 0)) == "triton"


# ------------------------------------------------------------------------------- the HSIC-terms formula
def gram_stats(xs):
    """float64 G (L×L), D and R (L×n) of a batch, written from the definitions (no streaming)."""
    ks = [x.double() @ x.double().T for x in xs]
    kts = [k - torch.diag(torch.diagonal(k)) for k in ks]
    g = torch.stack([torch.stack([(ki * kj).sum() for kj in kts]) for ki in kts])
    return ks, g, torch.stack([torch.diagonal(k) for k in ks]), torch.stack([k.sum(1) for k in kts])


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("num_layers,n,d", [(3, 4, 1), (4, 5, 3), (2, 5, 1), (5, 17, 6), (3, 33, 40)])
def test_hsic_terms_match_spec_and_pairwise_reference(estimator, num_layers, n, d):
    from sglp_fast.similarity.hsic_terms import hsic_terms, hsic_terms_ref

    g_ = torch.Generator().manual_seed(num_layers * 1000 + n * 10 + d)
    xs = [torch.randn(n, d, generator=g_, dtype=torch.float64) + 2.0 for _ in range(num_layers)]
    ks, g, diags, rowsums = gram_stats(xs)
    fast = hsic_terms(g, diags, rowsums, n, estimator)
    spec = hsic_terms_ref(g.numpy(), diags.numpy(), rowsums.numpy(), n, estimator)
    pairs = np.array([[ref_hsic(ki.numpy(), kj.numpy(), estimator) for kj in ks] for ki in ks])
    scale = np.abs(pairs).max()
    assert fast.dtype == np.float64 and fast.shape == (num_layers, num_layers)
    assert np.array_equal(fast, fast.T)
    assert np.abs(fast - spec).max() <= 1e-12 * scale
    assert np.abs(fast - pairs).max() <= 1e-10 * scale
    assert np.abs(pairs - np.diag(np.diag(pairs))).max() > 1e-3 * scale  # off-diagonal terms really differ


def test_hsic_terms_reject_too_few_tokens_and_bad_shapes():
    from sglp_fast.similarity.hsic_terms import hsic_terms, hsic_terms_ref

    for n in (1, 2, 3):
        ks, g, dg, rs = gram_stats([torch.randn(n, 2, dtype=torch.float64) for _ in range(2)])
        for fn in (hsic_terms, hsic_terms_ref):
            with pytest.raises(ValueError, match="n: the unbiased estimator needs n >= 4"):
                fn(g, dg, rs, n, "unbiased")
        if n >= 2:
            assert np.isfinite(hsic_terms(g, dg, rs, n, "biased")).all()
        else:
            with pytest.raises(ValueError, match="n >= 2"):
                hsic_terms(g, dg, rs, n, "biased")
    _, g, dg, rs = gram_stats([torch.randn(6, 2, dtype=torch.float64) for _ in range(2)])
    with pytest.raises(ValueError, match="g/diags/rowsums: expected shapes"):
        hsic_terms(g, dg[:, :5], rs, 6)
    with pytest.raises(ValueError, match="estimator"):
        hsic_terms(g, dg, rs, 6, "debiased")


# ------------------------------------------------------------------------------------------------ RBF
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n,d", [(4, 1), (17, 3), (130, 5)])
def test_rbf_from_linear_matches_reference(n, d, dtype, tol):
    from sglp_fast.similarity.rbf import rbf_from_linear_, rbf_gram_from_linear_, rbf_kernel_ref

    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d), dtype=torch.float64) + 1.5
    ref, ref_sigma2 = rbf_kernel_ref(x)
    xw = x.to(dtype)
    k = xw @ xw.T
    sq = torch.diagonal(k).clone()
    rowsum, diag, sigma2, shift = rbf_gram_from_linear_(k, sq)
    got = k.double().numpy() + float(shift)  # undo the shift: the plain RBF kernel off the diagonal
    off = ~np.eye(n, dtype=bool)
    assert abs(float(sigma2) - ref_sigma2) <= tol * ref_sigma2
    assert np.linalg.norm((got - ref)[off]) <= tol * np.linalg.norm(ref[off])
    assert bool((torch.diagonal(k) == 0).all())
    assert np.allclose(diag.double().numpy(), 1.0 - float(shift), rtol=0, atol=tol)
    assert np.allclose(rowsum.double().numpy(), (ref - np.eye(n) - float(shift) * off).sum(1), atol=tol * n)
    # one row panel [start, stop) converted on its own gives the same rows as the full conversion
    start, stop = n // 3, n - n // 4
    panel = xw[start:stop] @ xw.T
    panel_sums = rbf_from_linear_(panel, sq[start:stop], sq, start, sigma2, shift)
    assert rel_close(panel, k[start:stop], tol)
    assert torch.allclose(panel_sums.double(), rowsum[start:stop].double(), rtol=0, atol=tol * n)


def rel_close(a, b, tol):
    return float((a.double() - b.double()).norm()) <= tol * float(b.double().norm())


def test_rbf_bandwidth_errors():
    from sglp_fast.similarity.rbf import rbf_gram_from_linear_, rbf_sigma2

    with pytest.raises(ValueError, match="n >= 2"):
        rbf_sigma2(torch.zeros(1, 1))
    x = torch.zeros(6, 3)
    x[0] = 1.0  # 5 of 6 tokens coincide: the median distance is 0
    k = x @ x.T
    with pytest.raises(ValueError, match="layer 2: the median pairwise distance is 0"):
        rbf_gram_from_linear_(k, torch.diagonal(k).clone(), "layer 2")


# ------------------------------------------------------------------------------ close / context manager
def test_context_manager_frees_the_store(tmp_path):
    xs = [torch.randn(12, 40) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="discarding 1 incomplete batch"):
        with CKAAccumulator(num_layers=3, backend="torch", cache="disk", cache_dir=str(tmp_path)) as acc:
            acc.update_layer(0, xs[0], "a")
            acc.update_layer(1, xs[1], "a")
            assert len(list(tmp_path.rglob("*.bin"))) == 2
    assert list(tmp_path.iterdir()) == []  # files and the store's folder are gone
    assert acc.pending_batches == {} and acc._store is None
    # an error inside the block: everything freed, the error propagates unchanged (no extra warning)
    with pytest.raises(KeyError, match="boom"):
        with CKAAccumulator(num_layers=3, backend="torch", cache="disk", cache_dir=str(tmp_path)) as acc:
            acc.update_layer(0, xs[0], "a")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
    # complete batches' sums outlive close(); close() is idempotent; the accumulator keeps working after it
    with CKAAccumulator(num_layers=3, backend="torch", cache="disk", cache_dir=str(tmp_path)) as acc:
        for layer in range(3):
            acc.update_layer(layer, xs[layer], 0)
    before = acc.result()
    acc.close()
    for layer in range(3):
        acc.update_layer(layer, xs[layer], 1)
    acc.close()
    assert np.abs(acc.result() - before).max() <= 1e-6 and acc.num_batches == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("order", ["batch", "layer"])
def test_triton_backend_is_bit_reproducible(order):
    """Same inputs, same bits (no atomics in the kernels). Meaningful on a GPU, where atomics reorder;
    tests/test_kernels.py also checks the kernels with the interpreter's program order reversed."""
    batches = make_batches(2, 5, 45, 7, seed=31)
    a = run(batches, order, backend="triton", space="gram", panel_rows=16).hsic()
    b = run(batches, order, backend="triton", space="gram", panel_rows=16).hsic()
    assert np.array_equal(a, b)
