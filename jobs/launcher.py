"""The one way jobs run the project's stages: each stage's own CLI, as a user types it, or its `run` in this process.

Used by `jobs/demo.py` (output shown live) and by `jobs/compare_inits.py` and the studies built on it (output in a
log file per run). A stage that fails raises `StageFailed` with the command's exit status and the last lines it
printed; the caller words the fix (re-running resumes every stage).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = {
    "pretrain": "trainer/pretrain.py",
    "generate": "pipeline/generate.py",
    "mid": "trainer/mid.py",
    "post": "trainer/post.py",
}
Stage = Literal["pretrain", "generate", "mid", "post"]


class StageFailed(RuntimeError):
    """A stage's CLI exited non-zero or refused its settings; the message ends with what it printed last."""


def last_lines(text: str, count: int = 25) -> str:
    """The last `count` lines of a command's output (what a failure message quotes)."""
    return "\n".join(text.splitlines()[-count:])


def stage_command(stage: Stage, args: Sequence[str]) -> list[str]:
    """`python <script> args...` with this interpreter, the by-path command README shows."""
    return [sys.executable, str(REPO / STAGE_SCRIPTS[stage]), *args]


def run_stage(stage: Stage, args: Sequence[str], *, log_path: Path | None = None) -> str:
    """Run a stage's CLI from the project root and return its standard output.

    With `log_path`, standard output and error go to that file (the command on its first line). Without, standard
    output is shown live and captured, and standard error (progress bars) goes to the terminal.
    """
    command = stage_command(stage, args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False,
                                    env=env).returncode
        output = log_path.read_text(errors="replace")
        if status != 0:
            raise StageFailed(f"{STAGE_SCRIPTS[stage]} failed (exit {status}); last lines of {log_path}:\n"
                              f"{last_lines(output)}")
        return output
    print("$ " + " ".join(command), flush=True)
    lines = []
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    if process.returncode != 0:
        raise StageFailed(f"{STAGE_SCRIPTS[stage]} failed (exit {process.returncode}):\n{last_lines(''.join(lines))}")
    return "".join(lines)


def run_training_in_process(stage: Literal["mid", "post"], preset: str, overrides: Sequence[str],
                            log_path: Path) -> None:
    """`run(load_config(...))` of trainer/<stage>.py in this process (tests and quick studies); a one-line log."""
    from trainer.config import ConfigError, load_config

    if stage == "mid":
        from trainer.mid import MidConfig as Config
        from trainer.mid import run as stage_run
    else:
        from trainer.post import PostConfig as Config
        from trainer.post import run as stage_run
    try:
        stage_run(load_config(Config, preset, list(overrides)))
    except ConfigError as error:
        raise StageFailed(f"trainer/{stage}.py refused the settings {list(overrides)}: {error}") from error
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"in-process trainer/{stage}.py --config {preset} {' '.join(overrides)}\n")


def generation_summary(output: str) -> dict[str, Any]:
    """The last summary line pipeline/generate.py printed ({url, cache_hit, seconds, ...})."""
    from pipeline.generate import SUMMARY_PREFIX

    summaries = [line[len(SUMMARY_PREFIX):] for line in output.splitlines() if line.startswith(SUMMARY_PREFIX)]
    if not summaries:
        raise StageFailed(f"pipeline/generate.py printed no summary line ({SUMMARY_PREFIX.strip()}):\n"
                          + last_lines(output))
    return json.loads(summaries[-1])
