"""Console entry points and by-path scripts: every command resolves, and no project module shadows another package."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers import HANG_LIMIT_S

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("storage_schema", "pipeline", "trainer", "jobs")


def declared_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_names_a_main_that_takes_argv():
    scripts = declared_scripts()
    assert {"cmt-generate", "cmt-pretrain", "cmt-mid", "cmt-post", "cmt-sample"} <= set(scripts)
    for name, target in scripts.items():
        module_name, function_name = target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        assert callable(function), name
        assert "argv" in function.__code__.co_varnames[: function.__code__.co_argcount], name


def test_installed_console_script_runs_the_same_parser_as_the_by_path_command():
    """`make setup` installs the scripts beside the interpreter (pip install -e .)."""
    script = Path(sys.executable).parent / "cmt-generate"
    assert script.exists(), "console scripts are missing: re-run `pip install -e .` (make setup does it)"
    installed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    by_path = subprocess.run([sys.executable, str(REPO / "pipeline" / "generate.py"), "--help"], capture_output=True,
                             text=True, timeout=HANG_LIMIT_S, cwd=REPO)
    assert installed.returncode == 0, installed.stderr
    assert by_path.returncode == 0, by_path.stderr
    assert "--num-trajectories" in installed.stdout
    assert installed.stdout == by_path.stdout


def test_no_module_run_by_path_shadows_the_stdlib_or_an_installed_package():
    """A script run by path puts its own folder first on sys.path: no file or package there may hide another module."""
    taken = set(sys.stdlib_module_names)
    for distribution in importlib.metadata.distributions():
        if distribution.metadata["Name"] == "cmt-pipeline":
            continue
        top_level = distribution.read_text("top_level.txt")
        taken.update(top_level.split() if top_level else ())
        for file in distribution.files or ():
            head = str(file).split("/")[0]
            taken.add(head[:-3] if head.endswith(".py") else head)
    shadowing = [f"{package}/{entry.name}" for package in PACKAGES for entry in (REPO / package).iterdir()
                 if (entry.suffix == ".py" and entry.stem in taken) or (entry.is_dir() and entry.name in taken
                                                                       and (entry / "__init__.py").exists())]
    assert shadowing == []


def test_no_script_rewrites_sys_path():
    rewriting = [str(path.relative_to(REPO)) for package in PACKAGES for path in (REPO / package).rglob("*.py")
                 if "sys.path[" in path.read_text()]
    assert rewriting == []
