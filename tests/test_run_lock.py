"""One training process per run directory: a second stage process is refused before it writes; a killed holder
leaves no stale lock."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_LIMIT_S
from trainer.pretrain import main as pretrain_main
from trainer.run_lock import LOCK_NAME, RunDirectoryBusy, training_lock

REPO_ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys\n"
    "from trainer.run_lock import training_lock\n"
    "with training_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


def test_a_second_process_is_refused_without_writing_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("written by the first run\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"  # bounded by pytest's timeout if the holder hangs
        code = pretrain_main(["--config", str(REPO_ROOT / "jobs" / "tiny" / "pretrain.yaml"),
                              f"loop.output_dir={run_dir}"])
        error = capsys.readouterr().err
        assert code == 2
        assert f"loop.output_dir={run_dir} is being trained by another process (pid {holder.pid})" in error
        assert "or pass another loop.output_dir" in error
        assert (run_dir / "config.yaml").read_text() == "written by the first run\n"
        assert sorted(path.name for path in run_dir.iterdir()) == sorted(["config.yaml", LOCK_NAME])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=HANG_LIMIT_S)
    with training_lock(run_dir):  # the kernel dropped the dead holder's lock
        assert (run_dir / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_the_lock_is_released_after_each_run_in_one_process_and_other_ranks_take_none(tmp_path):
    with training_lock(tmp_path):
        with training_lock(tmp_path, hold=False):  # a rank that is not the main process
            pass
        with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()}"):
            with training_lock(tmp_path):
                pass
    with training_lock(tmp_path):  # a resumed run in the same process
        pass
