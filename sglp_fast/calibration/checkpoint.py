"""Resumable calibration: after each block, its outputs (the next block's inputs) go to a checkpoint folder.

Why this is enough to continue a killed run exactly: the pass is deterministic and every statistic it keeps
(the observers' CKA sums, block influence, relative update, the kept block inputs) is a function of the
blocks' inputs and outputs. A resumed run re-embeds the batches (cheap), replays the completed blocks from the
saved outputs instead of running them (each observer sees the very same tensors, in the same order, so its
state is bit-identical) and runs the rest. So the checkpoint holds no observer state at all: it works with
any observer, and a resumed run gives the same plan and byte-identical weights as an uninterrupted one.

Layout: ``manifest.json`` (format, version, fingerprint, completed blocks) and ``slot-LLLLL-bBBBBB.safetensors``
(slot 0: the embeddings; slot l + 1: block l's outputs), each written to a temporary name and renamed, the
manifest last, so a kill at any moment leaves a consistent checkpoint. The fingerprint (model config and a
sample of its embedding weights, the calibration token ids, the dtype, the device type, the gradient pass)
refuses a checkpoint made with another model, calibration or settings. Disk: (L + 1) x tokens x hidden x
itemsize bytes, said in the memory plan.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..models.base import config_fingerprint
from ..sizes import fmt_bytes

FORMAT = "sglp-calibration-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


def fingerprint(adapter: Any, batches: list[dict], act_dtype: torch.dtype, device: torch.device,
                gradients: bool, windows_per_call: int = 1) -> dict[str, Any]:
    """What a checkpoint must have been made with to be continued (``windows_per_call`` too: other call
    groupings round differently, and a resumed pass must be bit-identical to an uninterrupted one)."""
    tokens = hashlib.sha256()
    for b in batches:
        for key in sorted(b):
            tokens.update(key.encode())
            tokens.update(b[key].detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return {"config": config_fingerprint(adapter.config),
            "weights": _weights_sample(adapter), "tokens": tokens.hexdigest(),
            "num_blocks": adapter.num_blocks, "dtype": str(act_dtype).replace("torch.", ""),
            "device": torch.device(device).type, "gradients": bool(gradients),
            "windows_per_call": int(windows_per_call)}


def saved_windows_per_call(directory: str | os.PathLike) -> int | None:
    """The windows per block call a checkpoint was made with (None: no readable checkpoint there), so that a
    resume that leaves it automatic continues with the same grouping (the automatic choice on a GPU follows
    the free memory, which may differ from the first run's)."""
    try:
        with open(os.path.join(os.fspath(directory), MANIFEST), encoding="utf-8") as f:
            value = json.load(f).get("fingerprint", {}).get("windows_per_call")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value >= 1 else None


def _weights_sample(adapter: Any) -> str:
    """A hash of every 4099th value of the input embedding (loaded even for lazy models; enough to tell
    two checkpoints of one architecture apart without reading gigabytes)."""
    emb = adapter.model.get_input_embeddings() if hasattr(adapter.model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is None or weight.device.type == "meta":
        return "none"
    sample = weight.detach().reshape(-1)[::4099].to("cpu", torch.float64).contiguous()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()


class PassCheckpoint:
    """The checkpoint folder of one calibration pass: ``completed`` blocks are saved and can be replayed."""

    def __init__(self, directory: str | os.PathLike, fp: dict[str, Any], *, resume: bool, slot_bytes: int) -> None:
        self.directory = os.fspath(directory)
        self.fingerprint = fp
        self.completed = 0
        manifest = os.path.join(self.directory, MANIFEST)
        if resume:
            if not os.path.isfile(manifest):
                raise ValueError(f"resume: {self.directory!r} holds no calibration checkpoint ({MANIFEST} is "
                                 "missing); pass the --checkpoint-dir of the run to continue, or start anew")
            self.completed = self._read(manifest)
        else:
            if os.path.exists(manifest):
                raise ValueError(f"checkpoint_dir: {self.directory!r} already holds a calibration checkpoint; "
                                 "pass --resume to continue it, or an empty folder to start anew")
            os.makedirs(self.directory, exist_ok=True)
            self._write_manifest()
        need = (fp["num_blocks"] + 1 - self.completed) * slot_bytes
        free = shutil.disk_usage(self.directory).free
        if need > free:
            raise ValueError(f"checkpoint_dir: {self.directory!r} has {fmt_bytes(free)} free but the checkpoint "
                             f"needs {fmt_bytes(need)} more; free space or pass a folder on a bigger disk")

    def _read(self, manifest: str) -> int:
        try:
            with open(manifest, encoding="utf-8") as f:
                head = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"resume: {manifest} is not readable ({e}); the checkpoint is corrupted: start anew") from None
        if head.get("format") != FORMAT or head.get("version") != VERSION:
            raise ValueError(f"resume: {manifest} is not a version-{VERSION} sglp calibration checkpoint")
        theirs = head.get("fingerprint", {})
        differ = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
        if differ:
            raise ValueError(f"resume: the checkpoint in {self.directory!r} was made with another "
                             f"{', '.join(differ)} (model, calibration text or settings differ); rerun with the "
                             "same model and options, or start anew with an empty --checkpoint-dir")
        completed = int(head.get("completed_blocks", 0))
        missing = [s for s in range(completed + 1) if not os.path.isfile(self._slot_path(s, 0))]
        if missing:
            raise ValueError(f"resume: the checkpoint in {self.directory!r} lacks the saved outputs of slots "
                             f"{missing[:3]}; it is corrupted: start anew")
        return completed

    def _slot_path(self, slot: int, batch: int) -> str:
        return os.path.join(self.directory, f"slot-{slot:05d}-b{batch:06d}.safetensors")

    def _write_manifest(self) -> None:
        path = os.path.join(self.directory, MANIFEST)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                       "completed_blocks": self.completed}, f, indent=1)
        os.replace(path + ".tmp", path)

    def save(self, slot: int, batch: int, tensor: torch.Tensor) -> None:
        """Block ``slot - 1``'s output for ``batch`` (slot 0: the embedding), written atomically."""
        path = self._slot_path(slot, batch)
        data = tensor.detach().to("cpu").contiguous()
        try:
            save_file({"h": data}, path + ".tmp")
        except OSError as err:
            if err.errno == errno.ENOSPC:
                left = (self.fingerprint["num_blocks"] + 1 - slot) * data.numel() * data.element_size()
                raise OSError(errno.ENOSPC, f"checkpoint_dir: disk full in {self.directory!r} while saving block "
                              f"{slot - 1}'s outputs; about {fmt_bytes(left)} more are needed: free space or "
                              "pass a folder on a bigger disk (--resume continues from the last saved block)") from err
            raise
        os.replace(path + ".tmp", path)

    def load(self, slot: int, batch: int, device: torch.device) -> torch.Tensor:
        return load_file(self._slot_path(slot, batch))["h"].to(device)

    def block_done(self, block: int) -> None:
        """Every batch's output of ``block`` is saved: a resumed run replays blocks 0..block."""
        self.completed = block + 1
        self._write_manifest()

    def remove(self) -> None:
        """Delete what this checkpoint wrote (after the run's result is safe); other files stay."""
        for name in os.listdir(self.directory):
            if name == MANIFEST or (name.startswith("slot-") and name.endswith((".safetensors", ".tmp"))):
                os.remove(os.path.join(self.directory, name))
        try:
            os.rmdir(self.directory)
        except OSError:
            pass
