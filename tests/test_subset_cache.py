"""benchmarks/subset_cache.py: a cached subset is reused only by the code and settings that made it, and a
stopped write leaves the old record readable."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import subset_cache  # noqa: E402


def _tree(root: Path) -> Path:
    (root / "sglp_fast" / "selection").mkdir(parents=True)
    (root / "csrc").mkdir()
    (root / "sglp_fast" / "api.py").write_text("A = 1\n")
    (root / "sglp_fast" / "selection" / "verified.py").write_text("B = 2\n")
    (root / "csrc" / "fisher.cpp").write_text("int f();\n")
    script = root / "bench.py"
    script.write_text("print(1)\n")
    return script


def test_the_key_changes_with_any_source_the_setting_or_the_script(tmp_path):
    script = _tree(tmp_path)
    settings = {"calib_seqs": 16, "remove": [4, 6]}
    key = subset_cache.code_key([script], settings, root=tmp_path)
    assert key == subset_cache.code_key([script], dict(settings), root=tmp_path)  # deterministic
    changed = []
    for path, text in ((tmp_path / "sglp_fast" / "selection" / "verified.py", "B = 3\n"),
                       (tmp_path / "csrc" / "fisher.cpp", "int g();\n"), (script, "print(2)\n")):
        old = path.read_text()
        path.write_text(text)
        changed.append(subset_cache.code_key([script], settings, root=tmp_path))
        path.write_text(old)
    changed.append(subset_cache.code_key([script], {**settings, "remove": [4, 8]}, root=tmp_path))
    (tmp_path / "sglp_fast" / "new_module.py").write_text("")
    changed.append(subset_cache.code_key([script], settings, root=tmp_path))
    assert key not in changed and len(set(changed)) == len(changed)
    # a compiled or cached file is not a source: it does not change the key
    (tmp_path / "sglp_fast" / "new_module.py").unlink()
    (tmp_path / "sglp_fast" / "__pycache__").mkdir()
    (tmp_path / "sglp_fast" / "__pycache__" / "api.cpython-311.pyc").write_bytes(b"\0")
    assert subset_cache.code_key([script], settings, root=tmp_path) == key


def test_a_record_is_reused_only_under_its_key(tmp_path):
    record = {"rows": subset_cache.pack({("default", 0, 4): {"readme": 34.1}}), "cost": {"paper_s": 27.4}}
    cache = subset_cache.SubsetCache(tmp_path / "cache", "key-a")
    assert cache.load(0) is None  # nothing yet
    cache.save(0, record)
    assert cache.load(0) == record
    assert subset_cache.unpack(cache.load(0)["rows"]) == {("default", 0, 4): {"readme": 34.1}}
    assert cache.load(1) is None
    assert subset_cache.SubsetCache(tmp_path / "cache", "key-b").load(0) is None  # other code: recomputed
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_a_torn_or_foreign_file_is_not_a_record(tmp_path):
    cache = subset_cache.SubsetCache(tmp_path, "k")
    cache.path(0).write_text('{"key": "k", "rec')  # a write stopped halfway (not through save)
    assert cache.load(0) is None
    cache.path(0).write_text(json.dumps(["k", {}]))
    assert cache.load(0) is None
    cache.save(0, {"x": 1})
    assert cache.load(0) == {"x": 1}
