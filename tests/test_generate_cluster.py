"""`ray job submit -- python pipeline/generate.py` against a real cluster from `ray start --head`, loopback only."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline.generate import GenerateConfig
from pipeline.ray_cluster import connect_ray
from storage_schema import open_store
from tests.helpers import HANG_LIMIT_S, free_port, wait_until
from tests.test_generate import tiny_unet

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _listening_addresses(pids: set[int]) -> set[str]:
    """IP addresses on which the given processes listen for TCP connections."""
    return {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids
    }


def _is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the cluster whose session lives in `temp_dir` (their command lines name it)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


STOP_GRACE_S = 3.0


def _stop_cluster(temp_dir: str) -> None:
    """Stop this cluster's processes only: `ray stop --force` would also kill every other Ray on the machine."""
    processes = _cluster_processes(temp_dir)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    # A grace period, not a budget: some of Ray's processes ignore SIGTERM (the suite waited 30 s for them on every
    # run), and this throw-away cluster needs no clean exit, so what is still alive after it is killed.
    _, alive = psutil.wait_procs(processes, timeout=STOP_GRACE_S)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=HANG_LIMIT_S)


def _job_agent_answers(address: str, env: dict[str, str]) -> bool:
    """Whether the head's job agent accepts a submission: a no-op job is submitted and must succeed.

    `ray start` returns before the dashboard agent has registered with the job head; until it has, a submission is
    answered "No available agent to submit job". Any other failure is a real error and fails the test at once.
    """
    probe = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
        env=env, capture_output=True, text=True, timeout=HANG_LIMIT_S,
    )
    if probe.returncode == 0:
        return True
    output = probe.stdout + probe.stderr
    assert "No available agent" in output or "Connection refused" in output or "Cannot connect" in output, output
    return False


README = REPO / "README.md"
README_ADDRESS = "http://127.0.0.1:8265"
README_TEACHER = "$PWD/runs/digits/pretrain/export"
README_TRAJECTORIES = "--num-trajectories 4096"


def _readme_cluster_lines() -> tuple[str, str, str]:
    """README's `export RAY_AUTH_MODE=...`, `ray get-auth-token ...` and (joined) `ray job submit ...` lines."""
    lines = [line.split("  #")[0].strip() for line in README.read_text().splitlines()]
    export = next(line for line in lines if line.startswith("export RAY_AUTH_MODE="))
    token = next(line for line in lines if line.startswith("ray get-auth-token"))
    first = next(index for index, line in enumerate(lines) if line.startswith("ray job submit"))
    submit = lines[first]
    while submit.endswith("\\"):
        first += 1
        submit = submit[:-1] + lines[first]
    return export, token, submit


def _home_env(home: Path, temp_dir: str) -> dict[str, str]:
    """The environment of a user whose home is `home`, with README's `export` applied and no other Ray auth setting."""
    export, _, _ = _readme_cluster_lines()
    name, value = export.removeprefix("export ").split("=", 1)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", CMT_CACHE_DIR=str(Path(temp_dir) / "cache"))
    env[name] = value
    return env


@contextlib.contextmanager
def _readme_cluster(home: Path):
    """README's cluster in `home`: its `export` and `ray get-auth-token` lines, then `ray start --head` in a fresh temp
    dir on loopback; ready when its job agent runs a job. Stopping it touches only its own processes."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = _home_env(home, temp_dir)
    dashboard_port = free_port()
    start = [
        str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # ports of their own: Ray's fixed defaults (agent 52365, client 10001) clash with any other cluster here
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        token = subprocess.run(["bash", "-c", _readme_cluster_lines()[1]], env=env, capture_output=True, text=True,
                               timeout=HANG_LIMIT_S)
        assert token.returncode == 0, token.stdout + token.stderr
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=HANG_LIMIT_S)
        assert started.returncode == 0, started.stdout + started.stderr
        wait_until(lambda: _job_agent_answers(address, env), "the cluster's job agent accepts jobs", poll_s=1.0)
        yield {"env": env, "address": address, "temp_dir": temp_dir}
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """README's cluster started from a home where ~/.ray/auth_token already exists (left by any earlier Ray use)."""
    home = tmp_path_factory.mktemp("home-with-token")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    with _readme_cluster(home) as started:
        yield started


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory) -> Path:
    """A saved tiny DDPMPipeline teacher directory."""
    teacher = tmp_path_factory.mktemp("teacher") / "tiny"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(teacher)
    return teacher


def _run_readme_submit_line(cluster: dict, teacher: Path) -> subprocess.CompletedProcess:
    """README's `ray job submit` line as typed, with only the address, teacher path and N replaced by this test's."""
    _, _, submit = _readme_cluster_lines()
    assert README_ADDRESS in submit and README_TEACHER in submit and README_TRAJECTORIES in submit, submit
    line = (submit.replace(README_ADDRESS, cluster["address"]).replace(README_TEACHER, str(teacher))
            .replace(README_TRAJECTORIES, "--num-trajectories 16"))
    return subprocess.run(["bash", "-c", line], env=cluster["env"], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_LIMIT_S)


def _assert_one_complete_cached_store(cluster: dict) -> None:
    """The job wrote one complete store into the cluster's cache root, and it deep-validates."""
    stores = list((Path(cluster["temp_dir"]) / "cache" / "trajectories").glob("*.zarr"))
    assert len(stores) == 1, stores
    store = open_store(str(stores[0]))
    assert store.is_complete and store.validate(deep=True).ok


def test_every_cluster_service_binds_loopback_only(cluster):
    pids = {p.pid for p in psutil.process_iter(["cmdline"]) if cluster["temp_dir"] in " ".join(p.info["cmdline"] or [])}
    addresses = _listening_addresses(pids)
    assert pids and addresses, "the cluster's processes listen somewhere"
    assert all(_is_loopback(a) for a in addresses), addresses


def test_ray_job_submit_writes_a_store_that_deep_validates(cluster, saved_teacher, tmp_path):
    out = tmp_path / "store.zarr"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", str(REPO), "--",
        "python", "pipeline/generate.py", "--teacher", str(saved_teacher), "--num-trajectories", "24", "--steps", "4",
        "--shard-size", "8", "--chunk-size", "8", "--batch-size", "8", "--num-workers", "2", "--out", str(out),
    ]
    job = subprocess.run(submit, env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert job.returncode == 0, job.stdout + job.stderr
    assert "GENERATE_SUMMARY" in job.stdout
    store = open_store(str(out))
    assert store.committed_shards() == [0, 1, 2]
    report = store.validate(deep=True)
    assert report.ok, report.problems


def test_a_local_cluster_started_by_the_driver_binds_loopback_only():
    import ray

    assert connect_ray(GenerateConfig(teacher="unused", num_trajectories=1)), "no cluster was running: one is started"
    try:
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        addresses = _listening_addresses(children)
        assert addresses and all(_is_loopback(a) for a in addresses), addresses
    finally:
        ray.shutdown()


@pytest.mark.slow  # a job on a real cluster (and a second cluster): over 30 s on 2 loaded cores
def test_readme_submit_line_works_as_typed_from_a_home_with_a_ray_token(cluster, saved_teacher):
    job = _run_readme_submit_line(cluster, saved_teacher)
    assert job.returncode == 0, job.stdout + job.stderr
    _assert_one_complete_cached_store(cluster)


@pytest.mark.slow  # a job on a real cluster (and a second cluster): over 30 s on 2 loaded cores
def test_a_local_run_leaves_no_ray_state_in_the_home_and_readme_lines_work_after_it(saved_teacher, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _home_env(home, str(tmp_path))
    del env["RAY_AUTH_MODE"]  # a plain shell: README's export comes later
    local = subprocess.run(
        [sys.executable, "pipeline/generate.py", "--teacher", str(saved_teacher), "--num-trajectories", "8",
         "--steps", "2", "--out", str(tmp_path / "local.zarr"), "--no-progress"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S,
    )
    assert local.returncode == 0, local.stdout + local.stderr
    assert "Token authentication is enabled" in local.stderr, "the local cluster still uses token auth"
    assert not (home / ".ray").exists(), sorted(map(str, home.rglob("*")))
    with _readme_cluster(home) as started:
        job = _run_readme_submit_line(started, saved_teacher)
        assert job.returncode == 0, job.stdout + job.stderr
        _assert_one_complete_cached_store(started)
