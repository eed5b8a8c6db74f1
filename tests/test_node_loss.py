"""A lost node: a loopback Ray cluster loses the node whose worker is half-way through writing a shard to S3.

The cluster (`ray.cluster_utils.Cluster`, in a process of its own with a fresh temp dir and token) has a head that
runs no work (`num_cpus=0`, as Ray advises for the head of a larger cluster) and two worker nodes of one CPU each, so
the generation worker lands on a worker node and the other one can take over. (Two `ray start` processes cannot share
loopback: a joining node resolves 127.0.0.1 to the host's address, where the loopback-only head does not listen.)
The store lives on the loopback S3 server: a local --out is refused on a multi-node cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline.fault_points import POINT_ENV, RELEASE_FILE_ENV, hold_line, shard_stage
from storage_schema import open_store
from tests.helpers import HANG_LIMIT_S, free_port, process_ended, tiny_unet, wait_until
from tests.s3_server import new_bucket, object_digests
from tests.test_generate import _cli_args, _summary
from tests.test_generate_cluster import _cluster_processes, _is_loopback, _listening_addresses, _stop_cluster

REPO = Path(__file__).resolve().parents[1]
HELD_SHARD = 1

CLUSTER = r"""
import json, sys, threading
from ray.cluster_utils import Cluster

hang_limit_s, agent_ports = float(sys.argv[1]), json.loads(sys.argv[2])  # sys.argv[3]: $RAY_TMPDIR, to be found
loopback = {"node_ip_address": "127.0.0.1", "wait": False}
cluster = Cluster(initialize_head=True, head_node_args={
    **loopback, "num_cpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": agent_ports[0]})
for port in agent_ports[1:]:
    cluster.add_node(**loopback, num_cpus=1, dashboard_agent_listen_port=port)
cluster.wait_for_nodes(timeout=hang_limit_s)
print(json.dumps({"address": cluster.address}), flush=True)
threading.Event().wait()  # the cluster lives until the test stops this process
"""


@pytest.fixture
def cluster(tmp_path, s3_server):
    """Head (no CPUs) plus two one-CPU worker nodes; every worker holds shard 1 half-written until `release` exists."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    release = tmp_path / "release"
    env = dict(
        os.environ,
        RAY_TMPDIR=temp_dir,  # its files, "current cluster" file included, not in /tmp/ray where any ray.init() looks
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_DEDUP_LOGS="0",  # every worker's hold line reaches the driver as printed, none folded into "repeated"
        PYTHONUNBUFFERED="1",
        **{POINT_ENV: f"{shard_stage('traj_written')}:{HELD_SHARD}", RELEASE_FILE_ENV: str(release)},
    )
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER, str(HANG_LIMIT_S), json.dumps([free_port() for _ in range(3)]), temp_dir],
        env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        started = process.stdout.readline()  # blocks until every node registered (or the process died)
        assert started, f"the cluster process ended with {process.wait(timeout=HANG_LIMIT_S)} before its nodes were up"
        yield {"env": env, "address": json.loads(started)["address"], "release": release, "temp_dir": temp_dir}
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_processes(node_id: str) -> list[psutil.Process]:
    """Every process of one Ray node: its raylet (found by node id) and the raylet's descendants (workers, agents)."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or [""]
        if f"--node_id={node_id}" in " ".join(cmdline) and cmdline[0].endswith("raylet"):
            return [process, *process.children(recursive=True)]
    raise AssertionError(f"no raylet with node id {node_id}")


def _holds(line: str) -> tuple[int, str] | None:
    """(pid, node id) of a worker that reports holding the held shard, or None for any other line."""
    marker = f"{hold_line(shard_stage('traj_written'), HELD_SHARD)}pid="
    if marker not in line:
        return None
    pid, node = line.split(marker, 1)[1].split()
    return int(pid), node.removeprefix("node=")


@pytest.mark.slow
def test_a_node_lost_mid_shard_is_survived_and_the_store_is_byte_identical(cluster, tmp_path):
    teacher = tmp_path / "teacher"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(teacher)
    listening = _listening_addresses({process.pid for process in _cluster_processes(cluster["temp_dir"])})
    assert listening and all(_is_loopback(address) for address in listening), listening
    bucket = new_bucket()
    generate = [sys.executable, str(REPO / "pipeline" / "generate.py"), "--ray-address", cluster["address"]]

    cluster["release"].touch()  # the uninterrupted run passes the hold at once
    reference = subprocess.run([*generate, *_cli_args(teacher, f"{bucket}/reference.zarr", num_workers=1)], cwd=REPO,
                               env=cluster["env"], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    cluster["release"].unlink()

    url = f"{bucket}/node-lost.zarr"
    driver = subprocess.Popen([*generate, *_cli_args(teacher, url, num_workers=1)], cwd=REPO, env=cluster["env"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    holders = []
    for line in driver.stdout:  # a hang here is caught by pytest's outer limit
        output.append(line)
        holder = _holds(line)
        if holder is None:
            continue
        holders.append(holder)
        if len(holders) == 1:  # the first holder is half-way through shard 1: its whole node dies at once
            pid, node = holder
            lost = _node_processes(node)
            assert pid in {process.pid for process in lost}, "the holding worker runs on the node being killed"
            for process in lost:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
            wait_until(lambda: all(map(process_ended, lost)), f"every process of node {node} ended")
            assert "traj/c/1/0/0/0/0" in object_digests(url) and open_store(url).committed_shards() == [0]
            cluster["release"].touch()
    assert driver.wait(timeout=HANG_LIMIT_S) == 0, "".join(output)

    assert len(holders) == 2 and holders[1][1] != holders[0][1], f"shard 1 was redone on the other node: {holders}"
    summary = _summary("".join(output))
    assert summary["shards"] == "3/3" and holders[1][0] in summary["worker_pids"]
    assert open_store(url).validate(deep=True).ok
    assert object_digests(url) == object_digests(f"{bucket}/reference.zarr")
