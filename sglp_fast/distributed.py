"""Data-parallel helpers on ``torch.distributed``: the window split, float64 sums, gathers, the failure flag.

Stage 0: every stage may import it. Without an initialized process group (or with one rank) every function
is the identity: one process runs exactly as before.

How the pipeline uses it (``torchrun --nproc-per-node N -m sglp_fast prune ...`` or ``sglp_fast.prune`` /
``analyze`` inside an initialized group):

- ``window_range(n)``: rank r calibrates windows [start_r, end_r), contiguous and in order (sizes differ by at
  most one), so the global window order is the rank order and a gather in rank order is the global order.
- Every rank streams every block over its own windows; the *sums* are reduced (``all_reduce_sum``, float64):
  the CKA accumulator's HSIC sums, loss sums and loss-term counts, block-influence / relative-update sums and
  token counts, the Gram XᵀX and XᵀY of each compensation fit; GradNorm's block gradients (float32, summed
  before the norms: ``all_reduce_tensors_``); the verified search's per-check-window losses and the last-token
  states (``gather_rows``, in the global window order). Sums of the same numbers in another order: the plan
  equals the one-process plan up to floating-point reduction order (tests: CKA within 1e-6,
  compensation maps 1e-5, GradNorm 1e-5 relative; per-window check losses are bit-identical).
- Failures (``failure_guard``/``check_failures``): every collective of this module first all-reduces a
  per-rank failure flag (a [world] int64 vector). A rank that raises joins the next flag all-reduce with its
  flag set and its message (``all_gather_object``), so every other rank raises ``RankFailed`` naming it at its
  next collective instead of waiting for its data. Chosen over ``monitored_barrier``: that one is gloo-only
  and only says *which* rank is late after the full timeout; the flag works on NCCL too, costs 8·world bytes
  per collective and carries the error message. A rank that dies hard (killed, segfault) is caught by the
  process-group timeout (``SGLP_DIST_TIMEOUT`` seconds, default 1800) and by torchrun, which stops the others.
- ``comm_bytes``: the payload bytes each rank handed to collectives, per tag (what benchmarks report).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_TIMEOUT_S = 1800.0
comm_bytes: Counter = Counter()  # tag -> payload bytes this rank handed to collectives (for benchmarks)


class RankFailed(RuntimeError):
    """Another rank of the process group failed; the message names it and its error."""


# ------------------------------------------------------------------------------------------- the group
def _dist():
    import torch.distributed as dist  # noqa: PLC0415

    return dist


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the rank that writes the plan, the model and the report."""
    return rank() == 0


def timeout_s() -> float:
    raw = os.environ.get("SGLP_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"SGLP_DIST_TIMEOUT: expected seconds (a number > 0), got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"SGLP_DIST_TIMEOUT: expected seconds (a number > 0), got {raw!r}")
    return value


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env() -> bool:
    """Initialize the process group from torchrun's environment (WORLD_SIZE > 1), once; True if this call did.

    Backend NCCL when CUDA is available (device cuda:LOCAL_RANK), gloo otherwise; timeout ``timeout_s()``.
    """
    dist = _dist()
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; run one process")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend="nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s()))
    return True


def shutdown() -> None:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------- the split
def split_range(n: int, world: int, r: int) -> tuple[int, int]:
    """[start, end) of rank ``r``'s share of ``n`` items: contiguous, in order, sizes differ by <= 1."""
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def window_range(n: int) -> tuple[int, int]:
    """This rank's windows [start, end) of ``n`` calibration windows (every one without a process group)."""
    world = world_size()
    if n < world:
        raise ValueError(f"calib_seqs: {n} calibration windows cannot be split over {world} ranks (each rank "
                         f"needs at least one); use calib_seqs >= {world} or fewer processes")
    return split_range(n, world, rank())


# ------------------------------------------------------------------------------------------- failures
def _flag_exchange(failed: bool, message: str | None) -> None:
    """The failure-flag all-reduce every collective starts with; raises RankFailed if another rank failed."""
    dist = _dist()
    flags = torch.zeros(world_size(), dtype=torch.int64, device=_comm_device())
    flags[rank()] = 1 if failed else 0
    comm_bytes["failure_flag"] += flags.numel() * 8
    dist.all_reduce(flags)
    bad = [int(i) for i in torch.nonzero(flags.cpu()).flatten()]
    if not bad:
        return
    messages: list[Any] = [None] * world_size()
    dist.all_gather_object(messages, message if failed else None)
    if failed:
        return  # the failing rank re-raises its own error
    what = "; ".join(f"rank {r} of {world_size()} failed: {messages[r] or 'unknown error'}" for r in bad)
    raise RankFailed(f"{what} (rank {rank()} stopped too)")


def check_failures() -> None:
    """A stage boundary: raise RankFailed on every rank if any rank has reported a failure (collective)."""
    if is_distributed():
        _flag_exchange(False, None)


def report_failure(err: BaseException) -> None:
    """Tell the other ranks that this one failed (once per error): they raise RankFailed at their next
    collective.

    Communication errors here are swallowed: the caller re-raises ``err``.
    """
    if not is_distributed() or isinstance(err, RankFailed) or getattr(err, "_sglp_reported", False):
        return
    try:
        err._sglp_reported = True  # type: ignore[attr-defined]
    except AttributeError:
        pass
    try:
        _flag_exchange(True, f"{type(err).__name__}: {err}")
    except Exception:  # noqa: BLE001 - the group may be gone already; the original error matters
        pass


@contextlib.contextmanager
def failure_guard() -> Iterator[None]:
    """Run a distributed section: a rank that raises in it reports the failure before re-raising."""
    try:
        yield
    except BaseException as err:
        report_failure(err)
        raise


# ------------------------------------------------------------------------------------------- reductions
def all_reduce_sum(value: Any, tag: str = "sum") -> Any:
    """Sum over ranks in float64 of a number, numpy array or tensor (the same kind and shape back)."""
    if not is_distributed():
        return value
    _flag_exchange(False, None)
    if isinstance(value, torch.Tensor):
        buf = value.detach().to(_comm_device(), torch.float64).clone()
    else:
        buf = torch.as_tensor(np.asarray(value, dtype=np.float64), device=_comm_device()).clone()
    comm_bytes[tag] += buf.numel() * 8
    _dist().all_reduce(buf)
    if isinstance(value, torch.Tensor):
        return buf.to(value.device, value.dtype)
    out = buf.cpu().numpy()
    if isinstance(value, (int, np.integer)):
        return int(round(float(out)))
    if isinstance(value, (float, np.floating)):
        return float(out)
    return out


def all_reduce_tensors_(tensors: Sequence[torch.Tensor], tag: str = "tensors",
                        dtype: torch.dtype | None = None) -> None:
    """In place: each tensor becomes its sum over ranks; one collective for all of them (flattened).

    ``dtype``: the reduction dtype (default: at least float32 of the tensors' own dtype).
    """
    if not is_distributed() or not tensors:
        return
    _flag_exchange(False, None)
    if dtype is None:
        dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    flat = torch.cat([t.detach().reshape(-1).to(_comm_device(), dtype) for t in tensors])
    comm_bytes[tag] += flat.numel() * flat.element_size()
    _dist().all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.device, t.dtype))
        offset += n


def gather_rows(value: Any, axis: int = 0, tag: str = "gather") -> Any:
    """Concatenate every rank's ``value`` along ``axis`` in rank order (= the global window order), float64.

    Numpy arrays or tensors; the ranks' sizes along ``axis`` may differ (0 included), the other dims may not.
    """
    if not is_distributed():
        return value
    is_tensor = isinstance(value, torch.Tensor)
    arr = value.detach().cpu().to(torch.float64).numpy() if is_tensor else np.asarray(value, dtype=np.float64)
    moved = np.moveaxis(arr, axis, 0)
    sizes = all_reduce_sum(np.eye(world_size())[rank()] * moved.shape[0], tag=tag).astype(np.int64)
    rest = moved.shape[1:]
    width = int(np.prod(rest)) if rest else 1
    most = int(sizes.max())
    dist = _dist()
    buf = torch.zeros((most, width), dtype=torch.float64, device=_comm_device())
    if moved.shape[0]:
        mine = np.ascontiguousarray(moved.reshape(moved.shape[0], width))
        buf[: moved.shape[0]] = torch.from_numpy(mine).to(buf)
    parts = [torch.empty_like(buf) for _ in range(world_size())]
    comm_bytes[tag] += buf.numel() * 8 * world_size()
    dist.all_gather(parts, buf)
    rows = np.concatenate([p.cpu().numpy()[: int(n)] for p, n in zip(parts, sizes)], axis=0)
    out = np.moveaxis(rows.reshape((rows.shape[0],) + tuple(rest)), 0, axis)
    return torch.from_numpy(np.ascontiguousarray(out)) if is_tensor else out


def gather_lists(values: Sequence[float], tag: str = "gather") -> list[float]:
    """Every rank's list of numbers concatenated in rank order (float64)."""
    if not is_distributed():
        return list(values)
    return [float(x) for x in gather_rows(np.asarray(values, dtype=np.float64).reshape(-1), tag=tag)]
