"""ARCHITECTURE.md's layers hold: storage_schema <- pipeline <- trainer <- jobs, and no stage module imports another.

Every import counts, those inside functions too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("storage_schema", "pipeline", "trainer", "jobs")  # each may import only the ones before it
STAGES = ("trainer.pretrain", "trainer.mid", "trainer.post")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for rank, layer in enumerate(LAYERS):
        above = LAYERS[rank + 1:]
        for path in sorted((REPO / layer).rglob("*.py")):
            for name in imported_modules(path):
                if name.split(".")[0] in above:
                    upward.append(f"{module_name(path)} imports {name}")
    assert upward == []


def test_no_stage_module_imports_another_stage():
    crossing = [f"{stage} imports {name}" for stage in STAGES
                for name in imported_modules(REPO / (stage.replace(".", "/") + ".py"))
                if any(name == other or name.startswith(other + ".") for other in STAGES if other != stage)]
    assert crossing == []


def test_the_checks_see_imports_inside_functions(tmp_path):
    """The import walker itself: a lazy upward import inside a function is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef late():\n    from trainer.mid import run\n    return run\n")
    assert imported_modules(sample) == {"os", "trainer.mid"}
