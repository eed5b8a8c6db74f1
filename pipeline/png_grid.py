"""Sample grids: tile a batch of images in [-1, 1] into one PNG (numpy and PIL only: no torch, no torchvision).

Used by every layer that writes pictures: `pipeline/store_statistics.py` (trajectory strips of a store, which stays torch-free)
and the trainer's sample grids (`trainer/evaluation.py`, `trainer/sample.py`, `trainer/pretrain.py`). Torch tensors
are accepted as they are (anything with `.detach()` is moved to the CPU as float32 first).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["MIN_TILE_PIXELS", "grid_array", "save_grid"]

MIN_TILE_PIXELS = 32


def _as_array(images: Any) -> np.ndarray:
    """A float32 numpy array of `images` (a numpy array, or a torch tensor on any device)."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    return np.asarray(images, dtype=np.float32)


def grid_array(images: Any, nrow: int | None = None, padding: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile images [N, C, H, W] in [-1, 1] into a uint8 array [rows·(H·u+p)+p, cols·(W·u+p)+p, C] (C = 1 or 3)."""
    images = _as_array(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"save_grid needs images shaped [N, C, H, W] with C = 1 or 3, got {tuple(images.shape)}; "
            "decode latents to pixels first"
        )
    if images.shape[0] == 0:
        raise ValueError("save_grid got an empty batch; pass at least one image")
    if upscale < 1 or padding < 0:
        raise ValueError(f"upscale must be >= 1 and padding >= 0, got upscale={upscale}, padding={padding}")
    count, channels, height, width = images.shape
    columns = nrow if nrow is not None else math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    finite = np.nan_to_num(images, nan=-1.0, posinf=1.0, neginf=-1.0)  # a diverged student's NaN: black
    pixels = np.round((np.clip(finite, -1, 1) + 1) * 127.5).astype(np.uint8)  # [N, C, H, W], half to even
    pixels = pixels.repeat(upscale, axis=2).repeat(upscale, axis=3)  # [N, C, H·u, W·u]
    tile_h, tile_w = height * upscale, width * upscale
    grid = np.zeros((rows * (tile_h + padding) + padding, columns * (tile_w + padding) + padding, channels), np.uint8)
    for index in range(count):
        top = padding + (index // columns) * (tile_h + padding)
        left = padding + (index % columns) * (tile_w + padding)
        grid[top : top + tile_h, left : left + tile_w] = pixels[index].transpose(1, 2, 0)  # [H·u, W·u, C]
    return grid


def save_grid(
    images: Any,
    path: str | os.PathLike,
    nrow: int | None = None,
    upscale: int | None = None,
    padding: int = 1,
) -> Path:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid (atomically); `upscale` None enlarges small tiles.

    `nrow` is the number of images per row (default: a square-ish grid). Nearest-neighbour upscaling by
    `upscale` keeps 8×8 digits legible; None picks the smallest factor giving tiles of at least 32 pixels.
    """
    if upscale is None:
        upscale = max(1, math.ceil(MIN_TILE_PIXELS / max(images.shape[-2:])))
    grid = grid_array(images, nrow=nrow, padding=padding, upscale=upscale)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)  # "L" or "RGB"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
    with os.fdopen(handle, "wb") as stream:
        picture.save(stream, format="PNG")
    os.replace(temp_name, path)
    return path
