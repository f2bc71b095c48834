"""A killed run continues from its checkpoint to the same result; SIGTERM/SIGINT leave nothing behind."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_models import save_tiny
from sglp_fast.calibration import calibrate
from sglp_fast.calibration.checkpoint import MANIFEST
from sglp_fast.similarity import CKAAccumulator
from tiny_models import tiny_batches, tiny_model

REPO = Path(__file__).resolve().parent.parent


class _Crash(Exception):
    pass


class _CrashAt:
    """An observer that dies at one block: what a SIGKILL does to the pass, as far as the checkpoint can tell."""

    def __init__(self, block: int) -> None:
        self.block = block

    def observe(self, layer, block_input, block_output, batch_id, mask):
        if layer == self.block:
            raise _Crash()


def _cka_observer(acc):
    class Obs:
        def observe(self, layer, block_input, block_output, batch_id, mask):
            acc.update_layer(layer, block_output, batch_id, mask)
    return Obs()


def _run(model, batches, tmp, *, crash=None, resume=False, gradients=False, **kwargs):
    with CKAAccumulator(num_layers=6) as acc:
        observers = [_cka_observer(acc)] + ([_CrashAt(crash)] if crash is not None else [])
        res = calibrate(model, batches, observers=observers, gradients=gradients, progress=False, keep_inputs=3,
                        checkpoint_dir=tmp, resume=resume, **kwargs)
        return res, acc.result()


@pytest.mark.parametrize("gradients", [False, True])
@pytest.mark.parametrize("crash", [0, 3, 5])
def test_resumed_pass_equals_an_uninterrupted_one(tmp_path, crash, gradients):
    model = tiny_model("llama", layers=6, seed=crash + 10)
    batches = tiny_batches("llama", seed=crash + 20, shapes=((1, 17), (3, 5), (2, 9)))
    want, want_cka = _run(model, batches, tmp_path / "full", gradients=gradients)
    want.kept_inputs.close()
    with pytest.raises(_Crash):
        _run(model, batches, tmp_path / "ckpt", crash=crash, gradients=gradients)
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    assert manifest["completed_blocks"] == crash  # blocks before the crash are saved, the crashed one is not
    got, got_cka = _run(model, batches, tmp_path / "ckpt", resume=True, gradients=gradients)
    try:
        assert np.array_equal(got_cka, want_cka)  # bit for bit: the observer saw the very same tensors
        assert np.array_equal(got.block_influence, want.block_influence)
        assert np.array_equal(got.relative_update, want.relative_update)
        assert got.loss == want.loss
        if gradients:
            assert np.array_equal(got.grad_norm, want.grad_norm)
        for layer in range(7):
            for b in range(2):  # the kept inputs the verified search re-runs blocks from
                assert torch.equal(got.kept_inputs.block_input(layer, b),
                                   _run_again_input(model, batches, layer, b))
    finally:
        got.kept_inputs.close()
    got.checkpoint.remove()
    assert not (tmp_path / "ckpt").exists()


def _run_again_input(model, batches, layer, batch):
    res = calibrate(model, batches, gradients=False, progress=False, keep_inputs=3)
    try:
        return res.kept_inputs.block_input(layer, batch)
    finally:
        res.kept_inputs.close()


def test_checkpoint_of_another_calibration_or_model_is_refused(tmp_path):
    model = tiny_model("llama", layers=6, seed=1)
    batches = tiny_batches("llama", seed=2)
    with pytest.raises(_Crash):
        _run(model, batches, tmp_path, crash=2)
    with pytest.raises(ValueError, match="resume: .*another tokens"):
        _run(model, tiny_batches("llama", seed=3), tmp_path, resume=True)
    with pytest.raises(ValueError, match="resume: .*another .*weights"):
        _run(tiny_model("llama", layers=6, seed=7), batches, tmp_path, resume=True)
    with pytest.raises(ValueError, match="resume: .*another gradients"):
        _run(model, batches, tmp_path, resume=True, gradients=True)
    with pytest.raises(ValueError, match="already holds a calibration checkpoint"):
        _run(model, batches, tmp_path)  # a new run may not overwrite it silently
    with pytest.raises(ValueError, match="holds no calibration checkpoint"):
        _run(model, batches, tmp_path / "empty", resume=True)


def test_a_resume_continues_with_the_first_runs_windows_per_call(tmp_path):
    """Grouping windows per block call rounds differently, so it is part of the checkpoint: a resume that asks
    for another value is refused, one that leaves it automatic takes the saved one (and is bit-identical)."""
    model = tiny_model("llama", layers=6, seed=4)
    batches = tiny_batches("llama", seed=5, shapes=((1, 8), (1, 8), (1, 8), (1, 8)))  # one shape: groupable
    # 2, not the automatic choice here (4): a resume that re-chose it would be refused as "another" one
    want, want_cka = _run(model, batches, tmp_path / "full", windows_per_call=2)
    want.kept_inputs.close()
    with pytest.raises(_Crash):
        _run(model, batches, tmp_path / "ckpt", crash=3, windows_per_call=2)
    assert json.loads((tmp_path / "ckpt" / MANIFEST).read_text())["fingerprint"]["windows_per_call"] == 2
    with pytest.raises(ValueError, match="resume: .*another windows_per_call"):
        _run(model, batches, tmp_path / "ckpt", resume=True, windows_per_call=1)
    got, got_cka = _run(model, batches, tmp_path / "ckpt", resume=True)  # automatic: the checkpoint's 2
    got.kept_inputs.close()
    assert np.array_equal(got_cka, want_cka) and got.loss == want.loss
    assert np.array_equal(got.relative_update, want.relative_update)
    got.checkpoint.remove()


# ------------------------------------------------------------------------------------------ the real CLI
# the CLI in a subprocess; SGLP_TEST_BLOCK_DELAY makes each block slow enough to be killed in the middle
_LAUNCH = textwrap.dedent("""
    import os, sys, time
    delay = float(os.environ.get("SGLP_TEST_BLOCK_DELAY", "0"))
    pause = os.environ.get("SGLP_TEST_PAUSE_IN")
    if delay:
        from sglp_fast.models.base import BlockAdapter
        call = BlockAdapter.call_block
        def slow(self, *a, **k):
            time.sleep(delay)
            return call(self, *a, **k)
        BlockAdapter.call_block = slow
    if pause:  # stop inside the output's temporary folder, when the heatmap is written
        import sglp_fast.pruning.save as save
        draw = save.save_cka_heatmap
        def slow_draw(*a, **k):
            open(pause, "w").close()
            time.sleep(60)
            return draw(*a, **k)
        save.save_cka_heatmap = slow_draw
    from sglp_fast.cli import main
    sys.exit(main(sys.argv[1:]))
""")
FLAGS = ["--calib-seqs", "6", "--seq-len", "16", "--verify-windows", "2", "--no-eval", "-q"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", "llama", layers=6)


def _popen(args, env_extra=None, cwd=None):
    env = {**os.environ, "TRITON_INTERPRET": "1", **(env_extra or {})}
    # a job started in the background of a non-interactive shell inherits SIGINT ignored, and Python then
    # never turns SIGINT into KeyboardInterrupt: give the child the default disposition, as a terminal would
    return subprocess.Popen([sys.executable, "-c", _LAUNCH, *map(str, args)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, proc, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the event: rc={proc.returncode}, {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _completed(ckpt: Path) -> int:
    try:
        return json.loads((ckpt / MANIFEST).read_text())["completed_blocks"]
    except (OSError, ValueError):
        return -1


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_sigkill_then_resume_gives_the_same_files(model_dir, tmp_path):
    whole = _popen(["prune", model_dir, "--remove", 2, *FLAGS, "-o", tmp_path / "whole"])
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    ckpt = tmp_path / "ckpt"
    run = _popen(["prune", model_dir, "--remove", 2, *FLAGS, "-o", tmp_path / "out", "--checkpoint-dir", ckpt],
                 {"SGLP_TEST_BLOCK_DELAY": "0.3"})
    _wait_for(lambda: _completed(ckpt) >= 2, run)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    done = _completed(ckpt)
    assert 2 <= done < 6 and not (tmp_path / "out").exists()
    again = _popen(["prune", model_dir, "--remove", 2, *FLAGS, "-o", tmp_path / "out", "--resume", ckpt])
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert _digest(tmp_path / "out") == _digest(tmp_path / "whole")  # plan.json, weights, config, cka.png ...
    assert not ckpt.exists()  # removed once the result was saved


@pytest.mark.parametrize("sig, rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("when", ["calibration", "write"])
def test_signals_leave_nothing_behind(model_dir, tmp_path, sig, rc, when):
    offload = tmp_path / "offload"
    out = tmp_path / "out"
    marker = tmp_path / "writing"
    env = {"SGLP_TEST_BLOCK_DELAY": "0.3"} if when == "calibration" else {"SGLP_TEST_PAUSE_IN": str(marker)}
    # a memory budget just above the least this run needs sends part of the activation cache to
    # --offload-dir: it must go too (below the least the run is refused up front, naming it)
    budget = f"{int(_least_kib(model_dir) * 1.03)}KiB"
    run = _popen(["prune", model_dir, "--remove", 2, *FLAGS, "-o", out, "--offload-dir", offload,
                  "--max-memory", budget], env, cwd=tmp_path)
    if when == "calibration":
        _wait_for(lambda: offload.is_dir() and any(offload.iterdir()), run)
    else:
        _wait_for(marker.exists, run)
    run.send_signal(sig)
    assert run.wait(timeout=60) == rc
    err = run.stderr.read()
    assert "Traceback" not in err and ("terminated" if sig == signal.SIGTERM else "interrupted") in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no .out.tmp-* folder
    assert not offload.exists() or list(offload.iterdir()) == []  # the offload cache is gone


def _least_kib(model_dir) -> float:
    """The least memory this test's run needs, as the refusal of a 1 KiB budget names it."""
    probe = _popen(["prune", model_dir, "--remove", 2, *FLAGS, "-o", model_dir.parent / "never", "--max-memory",
                    "1KiB"])
    err = probe.communicate(timeout=120)[1]
    m = re.search(r"raise --max-memory to at least ([0-9.]+) KiB", err)
    assert probe.returncode == 2 and m, err
    return float(m.group(1))


def test_checkpoint_disk_full_names_the_bytes_still_needed(tmp_path, monkeypatch):
    import errno

    import sglp_fast.calibration.checkpoint as ck

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    model = tiny_model("llama", layers=6, seed=4)
    with pytest.raises(OSError, match=r"disk full .* about [\d.]+ KiB more are needed.*--resume") as e:
        _run(model, tiny_batches("llama", seed=5), tmp_path / "ck")
    assert e.value.errno == errno.ENOSPC
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_saved_files_get_the_usual_modes_and_help_names_the_default(tmp_path, model_dir):
    run = _popen(["prune", model_dir, "--remove", 1, *FLAGS, "-o", tmp_path / "o"])
    assert run.wait(timeout=300) == 0, run.stderr.read()
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "o").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f  # weights too (written through 0600 temp files)
    text = subprocess.run([sys.executable, "-m", "sglp_fast.cli", "--help"], capture_output=True, text=True).stdout
    assert "default 'verified'" in text and "GradNorm with --scorer gradnorm" in text
