"""Hub ids through huggingface_hub's own cache: snapshots by revision, weights only as needed, offline-aware errors.

Files are fetched with ``snapshot_download`` (so ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE`` and tokens work as
everywhere else); a model's safetensors are preferred, its pickled ``.bin`` is fetched only when the revision has no
safetensors. Nothing else in a repository (code, images) is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.teacher_files import WEIGHT_PREFIX, TeacherLoadError


def _hub_cache() -> Path:
    """The hub cache directory in use (HF_HUB_CACHE, else $HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    """True when HF_HUB_OFFLINE forbids downloads."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_revisions(repo_id: str) -> list[str]:
    """Branches, tags and PR refs of `repo_id` recorded in the hub cache, then cached commit hashes."""
    folder = _hub_cache() / f"models--{repo_id.replace('/', '--')}"
    refs = folder / "refs"
    names = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    snapshots = folder / "snapshots"
    commits = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
    return names + commits


def _download_hint(repo_id: str, revision: str | None) -> str:
    """The command that puts the repository into the cache."""
    return f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"


def snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """The local snapshot folder of `repo_id` at `revision` holding at least the files matching `patterns`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError as error:
        raise TeacherLoadError(
            f"--revision {revision}: {repo_id} has no such branch, tag, commit or pull-request ref on the hub; "
            f"use e.g. main, a commit hash or refs/pr/<N>"
        ) from error
    except RepositoryNotFoundError as error:
        raise TeacherLoadError(
            f"--teacher {repo_id}: no such repository on the hub (or it needs a token: `hf auth login`); check the id "
            "or pass a local diffusers directory"
        ) from error
    except LocalEntryNotFoundError as error:
        cached = cached_revisions(repo_id)
        if cached and revision is not None:
            raise TeacherLoadError(
                f"--revision {revision}: {repo_id} is in the hub cache {_hub_cache()} but not at that revision "
                f"(cached: {', '.join(cached)}); pick a cached one or run {_download_hint(repo_id, revision)} "
                "where there is network"
            ) from error
        why = "HF_HUB_OFFLINE=1 forbids downloading" if _offline() else "the hub could not be reached"
        raise TeacherLoadError(
            f"--teacher {repo_id}{at} is not in the hub cache {_hub_cache()} and {why}: run "
            f"{_download_hint(repo_id, revision)} where there is network (with the same HF_HOME), or pass a local "
            "diffusers directory"
        ) from error
    except (OSError, ValueError) as error:  # invalid ids, network failures below huggingface_hub's own errors
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TeacherLoadError(
            f"--teacher {repo_id}{at}: not a local directory, and fetching it as a hub id failed ({first_line}); "
            f"run {_download_hint(repo_id, revision)} where there is network, or pass a local diffusers directory"
        ) from error


def _has_weights(directory: Path) -> bool:
    """True when a model directory holds safetensors or pickled diffusers weights."""
    return any(p.name.startswith(WEIGHT_PREFIX) and p.suffix in (".safetensors", ".bin") for p in directory.iterdir())


def fetch_weights(repo_id: str, revision: str | None, root: Path, directory: Path) -> None:
    """Put one model directory's weights into the snapshot: safetensors if the revision has them, else the .bin."""
    prefix = "" if directory == root else f"{directory.relative_to(root).as_posix()}/"
    for suffix in (".safetensors", ".bin"):
        if _has_weights(directory):
            return
        snapshot(repo_id, revision, [f"{prefix}{WEIGHT_PREFIX}*{suffix}", f"{prefix}{WEIGHT_PREFIX}*{suffix}.index.json"])
    if not _has_weights(directory):
        raise TeacherLoadError(
            f"--teacher {repo_id}: the hub cache {_hub_cache()} has the configs of {prefix or 'the model'} but not its "
            f"weights ({WEIGHT_PREFIX}.safetensors or .bin); run {_download_hint(repo_id, revision)} where there is "
            "network"
        )
