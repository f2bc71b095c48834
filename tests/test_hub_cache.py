"""MODEL as a hub id found in the local Hugging Face cache (HF_HOME, HF_HUB_OFFLINE), never downloaded."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from pipeline_models import save_tiny


def _cache_with(tmp_path, repo: str):
    """A Hugging Face cache laid out as huggingface_hub writes it: blobs behind snapshots/<commit>/, refs/main."""
    src = save_tiny(tmp_path / "src", "llama", layers=3)
    home = tmp_path / "hf-home"
    repo_dir = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy2(f, snapshot / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return home


def _sglp(home, *argv):
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "sglp_fast.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cached_hub_id_loads_offline_and_a_missing_one_says_so(tmp_path):
    home = _cache_with(tmp_path, "tiny-org/tiny-llama")
    ok = _sglp(home, "eval", "tiny-org/tiny-llama", "--eval-seqs", "2", "--seq-len", "16", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["result"]["num_blocks"] == 3
    missing = _sglp(home, "eval", "tiny-org/not-cached", "--eval-seqs", "2", "--seq-len", "16")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "not in the local Hugging Face cache" in missing.stderr and "tiny-org/not-cached" in missing.stderr
