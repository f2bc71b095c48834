"""The folder layout is the data flow: no module of sglp_fast imports one of a later stage."""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sglp_fast"

# stage of each top-level part of sglp_fast, in the order data flows through them
STAGES = {
    "sizes": 0, "checks": 0, "progress": 0, "_fisher": 0,      # shared helpers, the C++ extension
    "hub_kernels_guard": 0,                                     # import-time fix, runs before transformers
    "distributed": 0,                                          # torch.distributed helpers (data-parallel)
    "models": 1, "calibration": 1,                             # adapters + the layer-by-layer pass
    "kernels": 2, "similarity": 2,                             # CKA
    "segmentation": 3,                                         # Fisher segments
    "selection": 4,                                            # scores, selectors, search, compensation
    "plan": 5,                                                 # the JSON plan
    "pruning": 6,                                              # apply, save
    "api": 7, "cli": 7, "compare": 7, "evaluate": 7, "lm_eval": 7, "__init__": 7, "__main__": 7,  # interfaces
}


def _module_name(path: pathlib.Path) -> list[str]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: pathlib.Path, source: str | None = None) -> list[tuple[int, list[str]]]:
    """(line, absolute module path as parts) of every import in the file, function-local ones included."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if node.module is None:  # from . import a, b: each name may be a module
                out += [(node.lineno, target + [alias.name]) for alias in node.names]
            else:
                out.append((node.lineno, target))
    return [(line, parts) for line, parts in out if parts[0] == "sglp_fast"]


def _stage(parts: list[str]) -> int | None:
    if len(parts) == 1:
        return STAGES["__init__"]
    return STAGES.get(parts[1])


FILES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_part_of_the_package_has_a_stage():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in FILES}
    assert tops - set(STAGES) == set(), "new top-level module: give it a stage in STAGES"


def _later_stage_imports(path: pathlib.Path, source: str | None = None) -> list[tuple[int, str]]:
    mine = _stage(_module_name(path))
    if path.name == "__init__.py" and path.parent == PACKAGE:
        return []  # the package root re-exports every stage's public names (lazily)
    return [(line, ".".join(parts)) for line, parts in _imports(path, source) if (_stage(parts) or 0) > mine]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_from_a_later_stage(path):
    later = _later_stage_imports(path)
    assert later == [], f"{path.relative_to(PACKAGE)} imports a later stage: {later}"


def test_the_check_sees_a_violation():
    """The check can fail: what calibration used to do (build the search's verifier) is reported."""
    runtime = PACKAGE / "calibration" / "runtime.py"
    source = "import torch\nfrom ..models import get_adapter\n\ndef f():\n    from ..selection.verifier import SkipVerifier\n"
    assert _later_stage_imports(runtime, source) == [(5, "sglp_fast.selection.verifier")]
    assert _later_stage_imports(PACKAGE / "plan.py", "from . import api\n") == [(1, "sglp_fast.api")]
