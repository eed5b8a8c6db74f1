"""Random-weight teachers in the exact layouts of the two published hub repositories, written into a hub cache.

    python jobs/published_teachers.py --hf-home /tmp/hf --scale published --dit-depth 2
    HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 python pipeline/generate.py --config jobs/imagenet256/generate.yaml ...

Each repository is written as ``huggingface_hub`` keeps it after a full download (``<HF_HOME>/hub/models--org--name``:
``blobs/`` named by the git or LFS object id, ``refs/``, ``snapshots/<commit>/`` of relative symlinks), with the file
list of the hub's revisions as published:

- ``google/ddpm-cifar10-32`` @ main (267b167): a *flat* repository: config.json, diffusion_pytorch_model.bin and
  .safetensors, model_index.json, scheduler_config.json at the root (plus modeling_ddpm.py, README.md, .gitattributes;
  the images/ folder is left out). Here modeling_ddpm.py leaves a marker file when run: it never may be.
- ``facebook/DiT-XL-2-256`` @ main (eab87f7): model_index.json, scheduler/, transformer/ and vae/ with *pickled*
  ``.bin`` weights only; ``refs/pr/1`` adds the safetensors conversion of both (the ref's commit hash here is a
  stand-in: only its short form 32d0e35 is known).

Config files carry the published keys and classes (their JSON sizes match the hub's: 699/256/180 bytes; 310/601/602
bytes); ``--scale tiny`` shrinks widths and depth for tests, ``--scale published`` keeps every value (``--dit-depth``
still lowers DiT-XL/2's 28 layers for CPU measurements). Weights are random (seeded), the same tensors in every format.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path

DDPM_REPO, DIT_REPO = "google/ddpm-cifar10-32", "facebook/DiT-XL-2-256"
DDPM_COMMIT = "267b167dc01f0e4e61923ea244e8b988f84deb80"
DIT_COMMIT = "eab87f77abd5aef071a632f08807fbaab0b704d0"
DIT_PR_COMMIT = hashlib.sha1(b"facebook/DiT-XL-2-256 refs/pr/1 stand-in").hexdigest()
MODELING_MARKER = "MODELING_DDPM_WAS_RUN"

DDPM_UNET = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.1.1", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
    "variance_type": "fixed_large",
}
DDPM_INDEX = {
    "_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1", "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}
DIT_TRANSFORMER = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False,
    "out_channels": 8, "patch_size": 2, "sample_size": 32, "upcast_attention": False, "use_linear_projection": False,
}
DIT_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.12.0.dev0", "_name_or_path": "stabilityai/sd-vae-ft-ema",
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
DIT_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None,
}
TINY = {  # width/depth values for tests; every key and class stays the published one
    "unet": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
    "transformer": {"attention_head_dim": 8, "num_attention_heads": 2, "num_layers": 1},
    "vae": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4},
}
MODELING_DDPM = f'''"""Stand-in for the repository's custom pipeline code. It must never be imported or run."""
import pathlib

pathlib.Path(__file__).resolve().parent.joinpath("{MODELING_MARKER}").touch()
'''
LFS_SUFFIXES = (".bin", ".safetensors")


def _json(config: dict) -> bytes:
    """A config file as diffusers writes it (sorted keys, 2-space indent, trailing newline)."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _object_id(name: str, data: bytes) -> str:
    """The name huggingface_hub gives a blob: the LFS sha256 for weights, the git blob sha1 for other files."""
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_repo(hub_cache: Path, repo_id: str, revisions: dict[str, tuple[str, dict[str, bytes]]]) -> Path:
    """Write `repo_id` into a hub cache: {ref name: (commit, {path: bytes})} as blobs, refs and snapshot symlinks."""
    folder = hub_cache / f"models--{repo_id.replace('/', '--')}"
    for ref, (commit, files) in revisions.items():
        ref_file = folder / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)
        for name, data in files.items():
            blob = folder / "blobs" / _object_id(name, data)
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = folder / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(os.path.relpath(blob, link.parent))
    return folder


def _scaled(config: dict, part: str, scale: str, **overrides) -> dict:
    """A published config, shrunk for `scale="tiny"`, with `overrides` applied last."""
    return {**config, **(TINY[part] if scale == "tiny" else {}), **overrides}


def _weights(config: dict, seed: int) -> dict[str, bytes]:
    """{pickled .bin, safetensors} bytes of one random-weight model built from its config (same tensors in both)."""
    import diffusers
    import torch
    from safetensors.torch import save

    torch.manual_seed(seed)
    cls = getattr(diffusers, config["_class_name"])
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    pickled = io.BytesIO()
    torch.save(state, pickled)
    return {".bin": pickled.getvalue(), ".safetensors": save(state)}


def ddpm_cifar10_files(scale: str, configs_only: bool = False) -> dict[str, bytes]:
    """The files of google/ddpm-cifar10-32 at main: a flat repository with .bin and .safetensors weights."""
    unet = _scaled(DDPM_UNET, "unet", scale)
    files = {
        ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# Denoising Diffusion Probabilistic Models (DDPM) - random-weight stand-in\n",
        "config.json": _json(unet), "model_index.json": _json(DDPM_INDEX),
        "scheduler_config.json": _json(DDPM_SCHEDULER), "modeling_ddpm.py": MODELING_DDPM.encode(),
    }
    if not configs_only:
        weights = _weights(unet, seed=0)
        files.update({f"diffusion_pytorch_model{suffix}": data for suffix, data in weights.items()})
    return files


def dit_256_files(scale: str, depth: int | None = None, configs_only: bool = False) -> dict[str, tuple[str, dict[str, bytes]]]:
    """The revisions of facebook/DiT-XL-2-256: main (.bin only) and refs/pr/1 (plus the safetensors conversion)."""
    transformer = _scaled(DIT_TRANSFORMER, "transformer", scale, **({"num_layers": depth} if depth else {}))
    vae = _scaled(DIT_VAE, "vae", scale)
    index = {
        "_class_name": "DiTPipeline", "_diffusers_version": "0.12.0.dev0",
        "id2label": {str(i): f"class {i}" for i in range(1000)},
        "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    main = {
        ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# Scalable Diffusion Models with Transformers (DiT) - random-weight stand-in\n",
        "model_index.json": _json(index), "scheduler/scheduler_config.json": _json(DIT_SCHEDULER),
        "transformer/config.json": _json(transformer), "vae/config.json": _json(vae),
    }
    pull_request = dict(main)
    if not configs_only:
        for part, config, seed in (("transformer", transformer, 1), ("vae", vae, 2)):
            weights = _weights(config, seed)
            main[f"{part}/diffusion_pytorch_model.bin"] = weights[".bin"]
            pull_request[f"{part}/diffusion_pytorch_model.bin"] = weights[".bin"]
            pull_request[f"{part}/diffusion_pytorch_model.safetensors"] = weights[".safetensors"]
    return {"main": (DIT_COMMIT, main), "refs/pr/1": (DIT_PR_COMMIT, pull_request)}


def populate(hf_home: Path, *, scale: str = "tiny", dit_depth: int | None = None, configs_only: bool = False,
             repos: tuple[str, ...] = (DDPM_REPO, DIT_REPO)) -> Path:
    """Write the published-layout repositories into `<hf_home>/hub`; returns that hub cache."""
    hub_cache = Path(hf_home) / "hub"
    if DDPM_REPO in repos:
        write_repo(hub_cache, DDPM_REPO, {"main": (DDPM_COMMIT, ddpm_cifar10_files(scale, configs_only))})
    if DIT_REPO in repos:
        write_repo(hub_cache, DIT_REPO, dit_256_files(scale, dit_depth, configs_only))
    return hub_cache


def main() -> int:
    """CLI: write the repositories and print the hub cache path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-home", required=True, help="HF_HOME to write into (the hub cache is <HF_HOME>/hub)")
    parser.add_argument("--scale", choices=["tiny", "published"], default="tiny")
    parser.add_argument("--dit-depth", type=int, default=None, help="DiT layers (published: 28)")
    parser.add_argument("--configs-only", action="store_true", help="configs without weights (enough for --dry-run)")
    parser.add_argument("--repo", action="append", choices=[DDPM_REPO, DIT_REPO], help="default: both")
    args = parser.parse_args()
    print(populate(Path(args.hf_home), scale=args.scale, dit_depth=args.dit_depth, configs_only=args.configs_only,
                   repos=tuple(args.repo or (DDPM_REPO, DIT_REPO))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
