"""Ray glue of the generation job: join a cluster or start a loopback-only local one, and check it before any actor.

Ray is imported inside the functions, after this module has set what Ray reads when it is first imported.
"""

from __future__ import annotations

import os
import secrets

from pipeline.generate_options import GenerateConfig, GenerateError
from storage_schema.spec import has_url_scheme

__all__ = ["check_cluster", "connect_ray"]

# Read by Ray when it is first imported (nothing above imports it): a cluster this process starts binds loopback
# only (127.0.0.1). pipeline/generate.py imports this module, so the job's driver sets it before any Ray import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _keep_local_token_in_memory() -> None:
    """Give a cluster this job starts its own auth token in this process's environment, inherited by its processes.

    Without one, Ray 2.60's `ray.init` writes a new token to ~/.ray/auth_token, and that file turns token auth on for
    every later `ray start --head` of the user, whose `ray job submit` then fails without RAY_AUTH_MODE=token. An
    explicit RAY_AUTH_MODE=disabled, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH of the user is left alone.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def connect_ray(cfg: GenerateConfig) -> bool:
    """Join the cluster named by --ray-address / RAY_ADDRESS, or start a loopback-only local one (returns True)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="warning")
        return False
    _keep_local_token_in_memory()
    # The workers are the job: Ray starts them at nice 15, where two busy processes on the machine starve them to a
    # few per cent of a core. A job submitted with `ray job submit` gets nice 0 from Ray itself; so does this one.
    os.environ.setdefault("RAY_worker_niceness", "0")
    needed = cfg.num_workers * cfg.cpus_per_worker
    ray.init(
        num_cpus=max(needed, os.cpu_count() or 1),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="warning",
    )
    return True


def check_cluster(cfg: GenerateConfig, url: str) -> None:
    """Before any actor starts: some node must fit one worker's CPUs and GPUs, and every node must see the output."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    fits = [n for n in alive if n["Resources"].get("CPU", 0) >= cfg.cpus_per_worker
            and n["Resources"].get("GPU", 0) >= cfg.gpus_per_worker]
    if not fits:
        nodes = "; ".join(
            f"{n.get('NodeManagerAddress', '?')}: {n['Resources'].get('CPU', 0):g} CPU, {n['Resources'].get('GPU', 0):g} GPU"
            for n in alive
        )
        raise GenerateError(
            f"each worker asks for --cpus-per-worker {cfg.cpus_per_worker} and --gpus-per-worker "
            f"{cfg.gpus_per_worker:g}, but no node of the Ray cluster has that much (nodes: {nodes}); no actor was "
            "started. Pass --gpus-per-worker 0 to run the teacher on CPUs, lower --cpus-per-worker, or join a cluster "
            "with GPUs (--ray-address)"
        )
    if len(alive) > 1 and not has_url_scheme(url):
        raise GenerateError(
            f"the Ray cluster has {len(alive)} nodes but the output {url} is a local path that other nodes cannot "
            f"reach: pass --out or --cache-root as a shared filesystem path visible on every node, or an object-store "
            f"URL such as s3://bucket/trajectories or gs://bucket/trajectories"
        )
