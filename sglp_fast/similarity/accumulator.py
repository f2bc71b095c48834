"""Streaming minibatch CKA between all layers: each layer's Gram once per batch, L×L sums in float64.

Math (DESIGN.md "CKA, exactly"). For one batch of n tokens, layer l's outputs X_l (n×d) are first centered
over the batch's tokens (HSIC is invariant to shifting X, and centering removes the cancellation that large
activation means would cause in fp32). K̃_l is the Gram with its diagonal set to 0, r_l = K̃_l 1, s_l = 1ᵀr_l,
and G_ij = Σ K̃_i ∘ K̃_j. Then, for every pair at once,

    unbiased (Song et al. 2012):  H = (G + s sᵀ/((n-1)(n-2)) - 2/(n-2) R Rᵀ) / (n(n-3))        n >= 4
    biased:                       H = (Gf - 2/n Rf Rfᵀ + sf sfᵀ/n²) / (n-1)²,  with full Grams:
                                  Gf = G + D Dᵀ, Rf = R + D (D = diagonals), sf = Rf 1           n >= 2

Minibatch CKA (Nguyen et al. 2021) sums H over batches and normalizes at the end:
CKA_ij = ΣH_ij / sqrt(ΣH_ii ΣH_jj).

The formula lives in :mod:`.hsic_terms` (``hsic_terms``, beside its per-pair float64 spec).

RBF kernel: k(a, b) = exp(-‖xa - xb‖² / (2σ²)), distances from the same Gram (Kaa + Kbb - 2Kab), median-
heuristic bandwidth per layer and batch: see :mod:`.rbf`.

G is computed in one of two spaces, per batch, by a FLOP count (RBF always uses the Gram space):
  gram space     L·n²·d (one Gram per layer) + L²·n²/2 (stacked products), streamed in row panels
  feature space  L²·n·d²/2: G_ij = ‖X_iᵀX_j‖_F² - D_i·D_j (cheaper when d² < n)
The gram space streams row panels: the L×panel×n stack of Gram rows is the only big buffer (never L×n×n).

Orders. ``update(batch)`` receives all layers of one batch. ``update_layer(l, x, batch_id)`` receives one
layer at a time in any order (the offloaded calibration runs layer-major). Each (batch, layer) leaves its
K̃ or centered X in the tiered store (device -> CPU -> disk, :class:`sglp_fast.calibration.store.TieredStore`,
keyed (layer, batch_id)); when a batch's last layer arrives, its L×L terms are formed from the store in one
streamed pass of row panels and its entries are freed. This reads each stored item once (L·n² bytes per
batch) instead of once per later layer (L²·n²/2).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from ..calibration.store import POLICIES as CACHE_TIERS
from ..calibration.store import StoreFullError, TieredStore
from .. import distributed
from ..checks import check_choice, check_int
from .hsic_terms import ESTIMATORS, hsic_terms
from .rbf import rbf_from_linear_, rbf_gram_from_linear_, rbf_sigma2  # noqa: F401  (rbf_sigma2: public)

KERNELS = ("linear", "rbf")
BACKENDS = ("auto", "triton", "torch")
SPACES = ("auto", "gram", "feature")
STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------- helpers
def _triton_kernels():
    """Import the kernels lazily: torch-only users never pay for importing triton."""
    from ..kernels import gram, hsic

    return gram, hsic


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    gram, _hsic = _triton_kernels()
    if device.type != "cuda" and not (device.type == "cpu" and gram.interpreter_active()):
        raise ValueError(
            f"backend: 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), but the data is "
            f"on {device}; use backend='auto' or backend='torch' on this device"
        )
    return "triton"


def choose_space(space: str, kernel: str, num_layers: int, n: int, d: int) -> str:
    if kernel == "rbf":
        if space == "feature":
            raise ValueError("space: the RBF kernel has no feature-space form; use space='auto' or 'gram'")
        return "gram"
    if space != "auto":
        return space
    gram_cost = num_layers * n * n * d + num_layers * num_layers * n * n / 2
    feature_cost = num_layers * num_layers * n * d * d / 2
    return "feature" if feature_cost < gram_cost else "gram"


@dataclass
class _PendingBatch:
    """A batch started by ``update_layer`` whose layers have not all arrived yet."""

    n: int  # tokens
    space: str  # "gram" | "feature": what its stored items are (K̃ or centered X)
    device: torch.device
    backend: str
    layers: dict = field(default_factory=dict)  # layer -> (diag, rowsum), float64 [n] each

    def missing(self, num_layers: int) -> list:
        return sorted(set(range(num_layers)) - set(self.layers))


# --------------------------------------------------------------------------------------------- the engine
class CKAAccumulator:
    """Accumulates unnormalized minibatch HSIC sums for L layers; ``result()`` normalizes to CKA.

    Accumulators are plain sums: ``state_dict``/``load_state_dict`` resume them and ``merge`` adds another
    accumulator's sums (e.g. after all-reducing across data-parallel ranks).

    estimator "unbiased" (default, n >= 4 tokens per batch) | "biased"; kernel "linear" | "rbf";
    backend "auto" (Triton on CUDA tensors, torch elsewhere) | "triton" | "torch"; device: where to compute
    (None: each input's own device); dtype: the torch backend's compute dtype (float32 | float64; the Triton
    path always accumulates in fp32); cache/cache_dir/cache_budget_bytes: where update_layer keeps items
    until a batch is complete, in a :class:`~sglp_fast.calibration.store.TieredStore` (``for_policy``:
    "auto": compute device up to the budget, default half its free memory, then on a GPU pinned CPU memory up
    to ``cache_cpu_budget_bytes``, default half the free RAM, then disk). space "auto" |
    "gram" | "feature" and panel_rows/panel_bytes (row-panel height; default ~256 MiB of panels on CPU,
    1 GiB on GPU) are tuning knobs.

    ``close()`` (or leaving a ``with CKAAccumulator(...) as acc:`` block) frees the stored items and their
    temporary files; batches still missing layers are discarded then.
    """

    def __init__(
        self,
        num_layers: int,
        estimator: str = "unbiased",
        kernel: str = "linear",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        cache: str = "auto",
        cache_dir: str | None = None,
        cache_budget_bytes: int | None = None,
        *,
        cache_cpu_budget_bytes: int | None = None,
        space: str = "auto",
        panel_rows: int | None = None,
        panel_bytes: int | None = None,
    ):
        check_int("num_layers", num_layers, 1, expected="an int >= 1")
        for name, value, allowed in (("estimator", estimator, ESTIMATORS), ("kernel", kernel, KERNELS),
                                     ("backend", backend, BACKENDS), ("cache", cache, CACHE_TIERS),
                                     ("space", space, SPACES)):
            check_choice(name, value, allowed)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected torch.float32 or torch.float64 (the compute dtype of the torch "
                            f"backend; inputs may be bf16/fp16/fp32), got {dtype}")
        check_int("panel_rows", panel_rows, 1, expected="an int >= 1 or None", optional=True)
        check_int("cache_budget_bytes", cache_budget_bytes, 0, expected="a non-negative int or None", optional=True)
        check_int("cache_cpu_budget_bytes", cache_cpu_budget_bytes, 0, expected="a non-negative int or None",
                  optional=True)
        self.num_layers, self.estimator, self.kernel, self.backend = num_layers, estimator, kernel, backend
        self.device = torch.device(device) if device is not None else None
        self.dtype, self.space = dtype, space
        self.panel_rows, self.panel_bytes = panel_rows, panel_bytes
        self._store_args = (cache, cache_dir, cache_budget_bytes)
        self._cpu_budget = cache_cpu_budget_bytes
        self._store: TieredStore | None = None
        if self.device is not None and backend == "triton":
            _resolve_backend(backend, self.device)  # fail early with the fix
        self._hsic = np.zeros((num_layers, num_layers), dtype=np.float64)
        self.num_batches = 0
        self.num_tokens = 0
        self._done_ids: set = set()
        self._pending: dict[object, _PendingBatch] = {}

    # ----------------------------------------------------------------------------------- input handling
    def _tokens(self, x, mask, where: str) -> torch.Tensor:
        """Validate one layer's output and return its [n, d] token matrix on the compute device."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: expected a torch.Tensor [n, d] or [batch, seq, d], got "
                            f"{type(x).__name__}")
        if x.ndim not in (2, 3):
            raise ValueError(f"{where}: expected a [n, d] or [batch, seq, d] tensor, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{where}: expected a floating-point tensor, got {x.dtype}; cast it with "
                            ".float()")
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask: expected a bool/0-1 torch.Tensor of shape {tuple(x.shape[:-1])}, got "
                                f"{type(mask).__name__}")
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"mask: expected shape {tuple(x.shape[:-1])} (the token dims of {where}), "
                                 f"got {tuple(mask.shape)}; pass the attention mask of this batch")
            if mask.dtype != torch.bool:
                if not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError("mask: expected only 0/1 (or bool) values, got others; pass a bool mask")
                mask = mask != 0
            x = x[mask.to(x.device)]
        else:
            x = x.reshape(-1, x.shape[-1])
        device = self.device if self.device is not None else x.device
        return x.detach().to(device)

    @staticmethod
    def _check_prepared(max_abs: torch.Tensor, wheres: list) -> None:
        """Raise for the first layer whose centered tokens are non-finite (NaN/inf anywhere propagates
        through the mean into every token) or all zero (zero variance). One device sync per batch."""
        values = max_abs.detach().double().cpu().numpy()
        for value, where in zip(values, wheres):
            if not np.isfinite(value):
                raise ValueError(f"{where}: contains NaN or inf; CKA of non-finite activations is "
                                 "undefined; fix the model's numerics (e.g. run it in float32) or mask those "
                                 "tokens out")
            if value == 0:
                raise ValueError(f"{where}: has zero variance over the batch's tokens (every token's output "
                                 "is identical), so CKA with this layer is undefined; drop this layer from "
                                 "the comparison or check the model")

    def _min_tokens(self) -> int:
        return 4 if self.estimator == "unbiased" else 2

    def _check_n(self, n: int, where: str) -> None:
        if n < self._min_tokens():
            raise ValueError(
                f"{where}: the {self.estimator} estimator needs n >= {self._min_tokens()} tokens per batch, "
                f"got n={n}; use larger calibration batches (or fewer masked-out tokens)"
            )

    def _prepare(self, x: torch.Tensor, backend: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Center over tokens; keep 16-bit storage for the Triton path (tensor cores), else the compute dtype.

        The mean is taken in fp32/fp64; a 16-bit input is centered in one pass with the mean rounded to its
        dtype: HSIC ignores any constant shift, so the rounding of the mean changes nothing but the tiny
        residual mean. The caller checks the result with :meth:`_check_prepared`.
        """
        work = torch.float64 if (backend == "torch" and self.dtype == torch.float64) else torch.float32
        mean = x.mean(0, keepdim=True, dtype=work)
        if backend == "triton" and x.dtype in (torch.bfloat16, torch.float16):
            target = x.dtype
        elif backend == "torch":
            target = self.dtype
        else:
            target = torch.float32
        if out is None:
            out = torch.empty(x.shape, device=x.device, dtype=target)
        if x.dtype == target:
            torch.sub(x, mean.to(target), out=out)
        else:
            out.copy_(x.to(work) - mean)
        return out

    # ------------------------------------------------------------------------------------ Gram panels
    def _panel_rows(self, n: int, device: torch.device, itemsize: int) -> int:
        if self.panel_rows is not None:
            return min(self.panel_rows, n)
        budget = self.panel_bytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
        rows = int(max(1, min(n, budget // max(1, self.num_layers * n * itemsize))))
        return rows if rows == n or rows < 128 else rows // 128 * 128  # tile multiples: fewer tuning keys

    def _gram_panel(self, x: torch.Tensor, start: int, rows: int, out: torch.Tensor, backend: str,
                    zero_diag: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Write K[start:start+rows] (diag zeroed if asked) into ``out``; return (diag, row sums) of it."""
        if backend == "triton":
            gram, _ = _triton_kernels()
            _, diag, rowsum = gram.gram_panel(x, start, rows, zero_diag=zero_diag, out=out)
            return diag, rowsum
        torch.matmul(x[..., start:start + rows, :], x.transpose(-1, -2), out=out)
        band = out.diagonal(offset=start, dim1=-2, dim2=-1)
        diag = band.clone()
        if zero_diag:
            band.zero_()
        return diag, out.sum(-1)

    def _rbf_full(self, x: torch.Tensor, backend: str, where: str):
        """One layer's full RBF K̃ (shifted, diag 0) with (row sums, diag, sigma2, squared norms, shift)."""
        n = x.shape[0]
        k = torch.empty((n, n), device=x.device, dtype=self._panel_dtype(backend))
        sq, _ = self._gram_panel(x, 0, n, k, backend, zero_diag=False)
        rowsum, diag, sigma2, shift = rbf_gram_from_linear_(k, sq, where)
        return k, rowsum, diag, sigma2, sq, shift

    def _panel_dtype(self, backend: str) -> torch.dtype:
        return torch.float32 if backend == "triton" else self.dtype

    def _stacked_product(self, f: torch.Tensor, acc: torch.Tensor, backend: str) -> None:
        """acc += F Fᵀ for the stacked flattened panels F [L, m]."""
        if backend == "triton":
            _, hsic = _triton_kernels()
            hsic.hsic_accumulate(f, out=acc)
        else:
            acc.addmm_(f, f.T)

    # --------------------------------------------------------------------------------- per-batch terms
    def _gram_space_terms(self, n: int, device: torch.device, backend: str, fill_panel) -> np.ndarray:
        """G (L×L float64) streamed over row panels; fill_panel(start, rows, out[L, rows, n]) writes K̃."""
        L = self.num_layers
        dt = self._panel_dtype(backend)
        bm = self._panel_rows(n, device, torch.empty((), dtype=dt).element_size())
        panel = torch.empty((L, bm, n), device=device, dtype=dt)
        acc = torch.zeros((L, L), device=device, dtype=dt)
        for start in range(0, n, bm):
            rows = min(bm, n - start)
            view = panel[:, :rows]
            fill_panel(start, rows, view)
            self._stacked_product(view.reshape(L, rows * n), acc, backend)
        return acc.double().cpu().numpy()

    def _feature_space_terms(self, xs: Sequence[torch.Tensor], diags: torch.Tensor) -> np.ndarray:
        """G_ij = ‖X_iᵀX_j‖² - D_i·D_j from cross-covariances (no n×n object at all)."""
        L = self.num_layers
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        xw = [x.to(work) for x in xs]
        g = torch.zeros((L, L), dtype=torch.float64, device=xs[0].device)
        for i in range(L):
            rest = torch.cat(xw[i:], dim=1)  # n × Σ_{j>=i} d_j
            cross = xw[i].T @ rest
            col = 0
            for j in range(i, L):
                dj = xw[j].shape[1]
                g[i, j] = g[j, i] = cross[:, col:col + dj].double().square().sum()
                col += dj
        g -= diags @ diags.T
        return g.cpu().numpy()

    def _add_batch(self, g: np.ndarray, diags: torch.Tensor, rowsums: torch.Tensor, n: int) -> None:
        """Turn one batch's G, D, R into HSIC terms (float64) and add them to the running sums."""
        self._hsic += hsic_terms(g, diags, rowsums, n, self.estimator)
        self.num_batches += 1
        self.num_tokens += n

    # ------------------------------------------------------------------------------------ batch-major
    def update(self, batch, mask: torch.Tensor | None = None) -> None:
        """All L layer outputs of one batch: L tensors, or one [L, n, d] / [L, b, s, d] tensor."""
        if isinstance(batch, torch.Tensor):
            if batch.ndim not in (3, 4):
                raise ValueError("batch: expected L tensors or an [L, n, d] / [L, b, s, d] tensor, got shape "
                                 f"{tuple(batch.shape)}")
            batch = list(batch.unbind(0))
        elif isinstance(batch, (list, tuple)):
            batch = list(batch)
        else:
            raise TypeError(f"batch: expected a list/tuple of {self.num_layers} tensors or a stacked "
                            f"tensor, got {type(batch).__name__}")
        if len(batch) != self.num_layers:
            raise ValueError(f"batch: expected {self.num_layers} layer outputs (num_layers), got "
                             f"{len(batch)}")
        xs = [self._tokens(x, mask, f"batch[{l}]") for l, x in enumerate(batch)]
        n = xs[0].shape[0]
        for l, x in enumerate(xs):
            if x.shape[0] != n:
                raise ValueError(f"batch[{l}]: has {x.shape[0]} tokens but batch[0] has {n}; every layer of "
                                 "a batch must cover the same tokens (same shape and mask)")
            if x.device != xs[0].device:
                raise ValueError(f"batch[{l}]: is on {x.device} but batch[0] is on {xs[0].device}; pass "
                                 "device=")
        self._check_n(n, "batch")
        device = xs[0].device
        backend = _resolve_backend(self.backend, device)
        xs = self._prepare_all(xs, backend)
        space = choose_space(self.space, self.kernel, self.num_layers, n, max(x.shape[-1] for x in xs))
        if space == "feature":
            diags = torch.stack([x.to(torch.float64 if self.dtype == torch.float64 else torch.float32)
                                 .square().sum(1) for x in xs]).double()
            rowsums = torch.stack([self._feature_rowsum(x, dg) for x, dg in zip(xs, diags)])
            g = self._feature_space_terms(list(xs), diags)
            self._add_batch(g, diags, rowsums, n)
            return
        dt = self._panel_dtype(backend)
        diags = torch.empty((self.num_layers, n), device=device, dtype=dt)
        rowsums = torch.empty((self.num_layers, n), device=device, dtype=dt)
        rbf = None
        if self.kernel == "rbf":  # bandwidths first: the median needs each layer's full distance matrix
            rbf = [self._rbf_full(x, backend, f"layer {l}")[3:] for l, x in enumerate(xs)]

        def fill(start, rows, out):
            stop = start + rows
            if isinstance(xs, torch.Tensor):  # one launch / one batched matmul for all layers
                dg, rs = self._gram_panel(xs, start, rows, out, backend, zero_diag=rbf is None)
            else:
                parts = [self._gram_panel(x, start, rows, out[l], backend, zero_diag=rbf is None)
                         for l, x in enumerate(xs)]
                dg, rs = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
            if rbf is None:
                diags[:, start:stop], rowsums[:, start:stop] = dg, rs
                return
            for layer, (sigma2, sq, shift) in enumerate(rbf):
                rowsums[layer, start:stop] = rbf_from_linear_(out[layer], sq[start:stop], sq, start, sigma2,
                                                              shift)
                diags[layer, start:stop] = 1.0 - shift

        g = self._gram_space_terms(n, device, backend, fill)
        self._add_batch(g, diags, rowsums, n)

    def _prepare_all(self, xs: list, backend: str):
        """Center every layer: into one [L, n, d] stack when widths agree (batched kernels), else a list."""
        wheres = [f"layer {l} (batch[{l}])" for l in range(len(xs))]
        inf = float("inf")
        if len({x.shape[1] for x in xs}) != 1:
            out = [self._prepare(x, backend) for x in xs]
            max_abs = torch.stack([torch.linalg.vector_norm(x.flatten(), ord=inf) for x in out])
        else:
            first = self._prepare(xs[0], backend)
            out = torch.empty((len(xs), *first.shape), device=first.device, dtype=first.dtype)
            out[0] = first
            del first
            for l in range(1, len(xs)):
                self._prepare(xs[l], backend, out=out[l])
            max_abs = torch.linalg.vector_norm(out.reshape(len(xs), -1), ord=inf, dim=1)
        self._check_prepared(max_abs, wheres)
        return out

    @staticmethod
    def _feature_rowsum(x: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        xw = x.to(diag.dtype)
        return xw @ xw.sum(0) - diag

    # ------------------------------------------------------------------------------------ layer-major
    def _store_for(self, device: torch.device) -> TieredStore:
        if self._store is None:
            policy, directory, budget = self._store_args
            self._store = TieredStore.for_policy(policy, device, budget, directory, self._cpu_budget)
        return self._store

    def _keep(self, store: TieredStore, layer: int, batch_id, item: torch.Tensor) -> None:
        """Store one (layer, batch) item; a full "device"/"cpu" budget names the argument and the fix."""
        try:
            store.put(layer, batch_id, item, owned=True)
        except StoreFullError:
            policy, _directory, budget = self._store_args
            nbytes = item.numel() * item.element_size()
            raise ValueError(
                f"cache_budget_bytes: caching batch {batch_id!r} layer {layer} needs {nbytes} more bytes but "
                f"{store.bytes_in_memory} of the {budget}-byte budget are used (cache={policy!r}); raise the "
                "budget, or use cache='auto' (spills to disk) or cache='disk'"
            ) from None

    def update_layer(self, layer: int, x: torch.Tensor, batch_id, mask: torch.Tensor | None = None) -> None:
        """Layer ``layer``'s output for batch ``batch_id`` (any layer order; each (layer, batch) once)."""
        check_int("layer", layer, 0, self.num_layers - 1, expected=f"an int in [0, {self.num_layers})")
        try:
            hash(batch_id)
        except TypeError:
            raise TypeError("batch_id: expected a hashable id (int or str), got "
                            f"{type(batch_id).__name__}") from None
        if batch_id in self._done_ids:
            raise ValueError(f"batch_id: batch {batch_id!r} already has all {self.num_layers} layers "
                             "accumulated; use a new id for new data")
        where = f"layer {layer} of batch {batch_id!r}"
        x = self._tokens(x, mask, where)
        n, d = x.shape
        self._check_n(n, where)
        backend = _resolve_backend(self.backend, x.device)
        pend = self._pending.get(batch_id)
        if pend is None:
            space = choose_space(self.space, self.kernel, self.num_layers, n, d)
            pend = _PendingBatch(n=n, space=space, device=x.device, backend=backend)
        elif layer in pend.layers:
            raise ValueError(f"layer: {where} was already given; each (layer, batch_id) is accumulated once")
        elif pend.n != n:
            raise ValueError(f"{where}: has {n} tokens but earlier layers of this batch had {pend.n}; "
                             "every layer of a batch must cover the same tokens (same shape and mask)")
        elif pend.device != x.device:
            raise ValueError(f"{where}: is on {x.device} but earlier layers of this batch were on "
                             f"{pend.device}; pass device= to the accumulator")
        xc = self._prepare(x, backend)
        self._check_prepared(torch.linalg.vector_norm(xc.flatten(), ord=float("inf"))[None], [where])
        store = self._store_for(x.device)
        if pend.space == "feature":
            work = torch.float64 if self.dtype == torch.float64 else torch.float32
            diag = xc.to(work).square().sum(1).double()
            rowsum = self._feature_rowsum(xc, diag)
            self._keep(store, layer, batch_id, xc)
        else:
            if self.kernel == "rbf":
                k, rowsum, diag = self._rbf_full(xc, backend, where)[:3]
            else:
                k = torch.empty((n, n), device=x.device, dtype=self._panel_dtype(backend))
                diag, rowsum = self._gram_panel(xc, 0, n, k, backend)
            self._keep(store, layer, batch_id, k)
            del k
        self._pending[batch_id] = pend
        pend.layers[layer] = (diag.double(), rowsum.double())
        if len(pend.layers) == self.num_layers:
            self._finish_batch(batch_id)

    def _finish_batch(self, batch_id) -> None:
        pend = self._pending.pop(batch_id)
        store = self._store
        L, n = self.num_layers, pend.n
        diags = torch.stack([pend.layers[l][0] for l in range(L)])
        rowsums = torch.stack([pend.layers[l][1] for l in range(L)])
        try:
            if pend.space == "feature":
                g = self._feature_space_terms([store.get(l, batch_id) for l in range(L)], diags)
            else:
                def fill(start, rows, out):
                    for layer in range(L):
                        out[layer].copy_(store.rows(layer, batch_id, start, start + rows))

                g = self._gram_space_terms(n, pend.device, pend.backend, fill)
        finally:
            for layer in range(L):
                store.free(layer, batch_id)
        self._add_batch(g, diags, rowsums, n)
        self._done_ids.add(batch_id)

    @property
    def pending_batches(self) -> dict:
        """batch_id -> sorted list of layers still missing (batches started by update_layer, not complete)."""
        return {b: p.missing(self.num_layers) for b, p in self._pending.items()}

    # ------------------------------------------------------------------------------------------ results
    def _check_complete(self, what: str) -> None:
        if self._pending:
            missing = {b: m[:8] for b, m in list(self.pending_batches.items())[:4]}
            raise ValueError(f"{what}: {len(self._pending)} batch(es) still miss layers (e.g. {missing}); "
                             "give every layer of every started batch_id to update_layer first")

    def hsic(self) -> np.ndarray:
        """L×L float64 sums over batches of the per-batch HSIC estimates (unnormalized)."""
        self._check_complete("hsic()")
        return self._hsic.copy()

    def result(self) -> np.ndarray:
        """L×L CKA (float64): symmetric, diagonal exactly 1."""
        h = self.hsic()
        if self.num_batches == 0:
            raise ValueError("result(): no batches were accumulated; call update()/update_layer() first")
        diag = np.diag(h).copy()
        bad = [int(i) for i in np.flatnonzero(~(diag > 0))]
        if bad:
            raise ValueError(
                f"result(): layer(s) {bad[:10]} have accumulated self-HSIC <= 0 ({diag[bad[0]]:.3g} for "
                f"layer {bad[0]}): their outputs have (near) zero variance over the calibration tokens, so CKA is "
                "undefined; exclude those layers or use more/longer calibration batches"
            )
        scale = 1.0 / np.sqrt(diag)
        cka = h * scale[:, None] * scale[None, :]
        cka = 0.5 * (cka + cka.T)
        np.fill_diagonal(cka, 1.0)
        return cka

    def _config(self) -> dict:
        return {"num_layers": self.num_layers, "estimator": self.estimator, "kernel": self.kernel}

    def state_dict(self) -> dict:
        """The sums and counts (complete batches only): enough to resume or to merge."""
        self._check_complete("state_dict()")
        return {"version": STATE_VERSION, **self._config(), "hsic": self._hsic.copy(),
                "num_batches": self.num_batches, "num_tokens": self.num_tokens,
                "batch_ids": sorted(self._done_ids, key=repr)}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError("state: expected a dict from CKAAccumulator.state_dict() (version "
                             f"{STATE_VERSION}), "
                             f"got {type(state).__name__} with version "
                             f"{getattr(state, 'get', lambda k: None)('version')!r}")
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ValueError(f"state: was saved with {key}={state.get(key)!r} but this accumulator has "
                                 f"{key}={value!r}; build the accumulator with the same settings")
        hsic = np.asarray(state["hsic"], dtype=np.float64)
        if hsic.shape != (self.num_layers, self.num_layers):
            raise ValueError(f"state: hsic has shape {hsic.shape}, expected {(self.num_layers,) * 2}")
        self._check_complete("load_state_dict()")
        self._hsic = hsic.copy()
        self.num_batches, self.num_tokens = int(state["num_batches"]), int(state["num_tokens"])
        self._done_ids = set(state.get("batch_ids", ()))

    def merge(self, other: "CKAAccumulator") -> "CKAAccumulator":
        """Add another accumulator's sums into this one (same settings); returns self."""
        if not isinstance(other, CKAAccumulator):
            raise TypeError(f"other: expected a CKAAccumulator, got {type(other).__name__}")
        if other._config() != self._config():
            raise ValueError(f"other: settings {other._config()} differ from this accumulator's "
                             f"{self._config()}; "
                             "only accumulators of the same layers/estimator/kernel can be merged")
        self._check_complete("merge()")
        other._check_complete("merge(other)")
        self._hsic += other._hsic
        self.num_batches += other.num_batches
        self.num_tokens += other.num_tokens
        self._done_ids |= other._done_ids
        return self

    def all_reduce(self) -> "CKAAccumulator":
        """Data-parallel: replace the sums and counts by their sums over the ranks of the process group
        (``sglp_fast.distributed``; every rank calls it once, after its last batch). Identity without a group.
        Communicates L² + 2 float64 numbers. Returns self."""
        self._check_complete("all_reduce()")
        if not distributed.is_distributed():
            return self
        flat = np.concatenate([self._hsic.ravel(), [float(self.num_batches), float(self.num_tokens)]])
        total = distributed.all_reduce_sum(flat, tag="cka")
        L = self.num_layers
        self._hsic = total[:L * L].reshape(L, L).copy()
        self.num_batches, self.num_tokens = int(round(total[-2])), int(round(total[-1]))
        return self

    def close(self) -> None:
        """Free the stored items and their temporary files (idempotent; the sums stay readable).

        Batches still missing layers lose their stored items, so they are discarded (with a warning).
        """
        if self._pending:
            warnings.warn(f"CKAAccumulator.close(): discarding {len(self._pending)} incomplete batch(es) "
                          f"(missing layers, e.g. {dict(list(self.pending_batches.items())[:2])})",
                          RuntimeWarning, stacklevel=2)
        self._discard()

    def _discard(self) -> None:
        self._pending.clear()
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "CKAAccumulator":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: free everything without adding a warning to the error
            self._discard()


def cka_matrix(activations: Iterable, *, masks: Iterable | None = None, num_layers: int | None = None,
               **kwargs) -> np.ndarray:
    """One-shot CKA over an iterable of batches (each as for :meth:`CKAAccumulator.update`).

    ``masks``: None, or an iterable with one token mask (or None) per batch. Other keywords go to
    :class:`CKAAccumulator`. Returns the L×L CKA matrix (numpy float64).
    """
    acc = None
    mask_iter = iter(masks) if masks is not None else None
    for batch in activations:
        mask = next(mask_iter, None) if mask_iter is not None else None
        if acc is None:
            count = num_layers if num_layers is not None else len(batch)
            acc = CKAAccumulator(num_layers=count, **kwargs)
        acc.update(batch, mask=mask)
    if acc is None:
        raise ValueError("activations: expected at least one batch, got an empty iterable")
    with acc:
        return acc.result()
