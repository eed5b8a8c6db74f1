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

from pipeline.generate import GenerateConfig, _connect_ray
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


def _stop_cluster(temp_dir: str) -> None:
    """Stop this cluster's processes only: `ray stop --force` would also kill every other Ray on the machine."""
    processes = _cluster_processes(temp_dir)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=HANG_LIMIT_S / 60)
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


@pytest.fixture(scope="module")
def cluster():
    """A real single-node Ray cluster (`ray start --head`) in a fresh temp dir, with the venv's python on PATH.

    Ready means its job agent runs a submitted job; stopping it touches only its own processes.
    """
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    dashboard_port = free_port()
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",  # token authentication, with a token of this cluster's own for start and submit
        RAY_AUTH_TOKEN=secrets.token_hex(32),
    )
    start = [
        str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--temp-dir", temp_dir, "--disable-usage-stats",
        # Ray's fixed default (52365) is taken whenever another cluster runs on this machine; the job agent's HTTP
        # service is then disabled and every submission waits for an agent that never comes.
        "--dashboard-agent-listen-port", str(free_port()),
    ]
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=HANG_LIMIT_S)
        assert started.returncode == 0, started.stdout + started.stderr
        wait_until(lambda: _job_agent_answers(address, env), "the cluster's job agent accepts jobs", poll_s=1.0)
        yield {"env": env, "address": address, "temp_dir": temp_dir}
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_every_cluster_service_binds_loopback_only(cluster):
    pids = {p.pid for p in psutil.process_iter(["cmdline"]) if cluster["temp_dir"] in " ".join(p.info["cmdline"] or [])}
    addresses = _listening_addresses(pids)
    assert pids and addresses, "the cluster's processes listen somewhere"
    assert all(_is_loopback(a) for a in addresses), addresses


def test_ray_job_submit_writes_a_store_that_deep_validates(cluster, tmp_path):
    teacher = tmp_path / "teacher"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(teacher)
    out = tmp_path / "store.zarr"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", str(REPO), "--",
        "python", "pipeline/generate.py", "--teacher", str(teacher), "--num-trajectories", "24", "--steps", "4",
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

    assert _connect_ray(GenerateConfig(teacher="unused", num_trajectories=1)), "no cluster was running: one is started"
    try:
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        addresses = _listening_addresses(children)
        assert addresses and all(_is_loopback(a) for a in addresses), addresses
    finally:
        ray.shutdown()
