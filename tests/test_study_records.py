"""jobs/study_records.py: a record shared by parallel study invocations is made once, by whichever gets there first,
and the other one reuses it (two real processes, ordered by files, not by timing)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from jobs.study_records import update_record
from tests.helpers import HANG_LIMIT_S, wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]

# A process that records `value` under "probe" unless an entry is there; with an `inside` file it signals that it is
# making the entry (inside the lock) and waits for the go file before it returns it.
MAKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from jobs.study_records import update_record

    record, value, inside, go, calling = sys.argv[1:6]

    def make(existing):
        if existing is not None:
            return existing
        if inside != "-":
            Path(inside).touch()
            while not Path(go).exists():
                time.sleep(0.02)
        return {"value": value}

    if calling != "-":
        Path(calling).touch()
    print(json.dumps(update_record(Path(record), "probe", make)))
""")


def start_maker(record: Path, value: str, inside: str = "-", go: str = "-", calling: str = "-") -> subprocess.Popen:
    """A process running MAKER (`calling`: a file it touches just before it calls update_record)."""
    return subprocess.Popen([sys.executable, "-c", MAKER, str(record), value, inside, go, calling], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)


def test_the_first_invocation_makes_the_entry_and_a_parallel_one_reuses_it(tmp_path):
    record = tmp_path / "out" / "generation.json"
    first = start_maker(record, "first", str(tmp_path / "inside"), str(tmp_path / "go"))
    wait_until(lambda: (tmp_path / "inside").exists() or first.poll() is not None, "the first process makes its entry")
    second = start_maker(record, "second", calling=str(tmp_path / "calling"))
    wait_until(lambda: (tmp_path / "calling").exists() or second.poll() is not None, "the second process calls")
    (tmp_path / "go").touch()  # only now may the first write; without the lock the second has read nothing by then
    outputs = [json.loads(process.communicate(timeout=HANG_LIMIT_S)[0]) for process in (first, second)]
    assert [output["value"] for output in outputs] == ["first", "first"]
    assert json.loads(record.read_text()) == {"probe": outputs[0]}


def test_an_entry_is_kept_or_replaced_as_make_decides_and_others_are_left_alone(tmp_path):
    record = tmp_path / "budgets.json"
    made = update_record(record, "a", lambda existing: {"steps": 5})
    assert made["steps"] == 5 and "recorded_at" in made
    assert update_record(record, "a", lambda existing: existing) == made
    update_record(record, "b", lambda existing: {"steps": 7})
    replaced = update_record(record, "a", lambda existing: {"steps": existing["steps"] + 1})
    assert json.loads(record.read_text()) == {"a": replaced, "b": json.loads(record.read_text())["b"]}
    assert replaced["steps"] == 6 and json.loads(record.read_text())["b"]["steps"] == 7
