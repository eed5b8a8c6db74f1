"""Sample-quality metrics: Fréchet distance in a small classifier's feature space, and FID with local weights.

FD-digits / FD-mnist follow FID's recipe (Heusel et al. 2017, eq. 6) with the Inception network replaced
by a small CNN trained once, deterministically, on the dataset itself. The classifier is cached on disk as

    <cache dir>/classifiers/<dataset>-<hash>.safetensors   weights (safetensors only)
    <cache dir>/classifiers/<dataset>-<hash>.json          held-out accuracy, recipe, training time

where the hash covers the architecture, the training recipe and the training data, and the cache dir
is `--cache-dir`, else the project's cache root (`$CMT_CACHE_DIR`, a directory or an fsspec URL; else
~/.cache/cmt-pipeline; `pipeline/paths.py`). A second call loads the file.

FD is biased by the number of samples (the covariance estimate is): compare models only at the same
number of generated samples, and read `real_vs_real_floor` as the value two real halves reach.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline.paths import cache_root, join, location, read_bytes, read_text, write_bytes, write_text
from trainer.image_datasets import ImageDataset, load_dataset, split_indices

CLASSIFIER_VERSION = "feature-cnn-1"  # bump when the training code changes in a way the recipe does not show
FD_DATASETS = ("digits", "mnist")
MIN_HOLDOUT_ACCURACY = {"digits": 0.97, "mnist": 0.95}


@dataclass(frozen=True)
class ClassifierRecipe:
    """Everything that decides the feature classifier's weights besides the data."""

    stem_channels: int = 32
    channels: int = 64
    feature_dim: int = 64
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    max_shift_pixels: int = 1
    holdout_fraction: float = 0.2
    seed: int = 0


RECIPES = {
    "digits": ClassifierRecipe(),
    "mnist": ClassifierRecipe(stem_channels=16, epochs=8, max_shift_pixels=2),
}


class FeatureClassifier(nn.Module):
    """Small CNN: conv-BN-ReLU stem, (max-pool, conv-BN-ReLU) stages to 4×4, hidden linear (features), ReLU, logits."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, recipe: ClassifierRecipe):
        super().__init__()
        channels, height, width = image_shape
        if height != width or height < 4 or height & (height - 1):
            raise ValueError(
                f"FeatureClassifier needs square images whose side is a power of two >= 4, got {image_shape}"
            )
        self.image_shape = tuple(image_shape)
        layers = _conv_bn_relu(channels, recipe.stem_channels)
        in_channels, side = recipe.stem_channels, height
        while side > 4:
            out_channels = min(2 * in_channels, recipe.channels)
            layers += [nn.MaxPool2d(2), *_conv_bn_relu(in_channels, out_channels)]
            in_channels, side = out_channels, side // 2
        layers += [*_conv_bn_relu(in_channels, recipe.channels), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.hidden = nn.Linear(recipe.channels * 4 * 4, recipe.feature_dim)
        self.head = nn.Linear(recipe.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, D] of images x [B, C, H, W] in [-1, 1] (the hidden layer before its ReLU)."""
        return self.hidden(self.body(x))  # [B, feature_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(F.relu(self.features(x)))


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3×3 convolution (same padding), batch norm, ReLU."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]


def default_cache_dir() -> str:
    """The project's cache root (`pipeline.paths.cache_root`: $CMT_CACHE_DIR, a path or URL, else ~/.cache)."""
    return cache_root()


def get_classifier(
    dataset: str, *, cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[FeatureClassifier, dict]:
    """Load the dataset's cached feature classifier, training it first (on CPU, deterministically) if absent.

    Returns (classifier in eval mode on `device`, info) with info keys accuracy, path, trained (True when
    this call trained it), train_seconds, recipe. Raises RuntimeError when a fresh training misses the
    held-out accuracy floor (`MIN_HOLDOUT_ACCURACY`); nothing is cached then.
    """
    data = _load_fd_dataset(dataset)
    recipe = RECIPES[dataset]
    weights_path = _classifier_path(data, recipe, cache_dir)
    weights, info_text = read_bytes(weights_path), read_text(weights_path.removesuffix(".safetensors") + ".json")
    if weights is not None and info_text is not None:
        classifier = FeatureClassifier(data.image_shape, data.num_classes, recipe)
        classifier.load_state_dict(load_safetensors(weights))
        info = json.loads(info_text) | {"path": weights_path, "trained": False}
    else:
        classifier, info = _train_and_cache(data, recipe, weights_path)
    return classifier.to(device).eval(), info


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance of Gaussians: ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^{1/2}) (Heusel et al. 2017, eq 6).

    Uses scipy.linalg.sqrtm and keeps its real part; when the product is near-singular and sqrtm returns
    non-finite values (or fails), 1e-6·I is added to both covariances. Round-off below zero is clipped to 0; statistics
    that are not finite (a diverged model's samples) give an infinite distance.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    cov1, cov2 = np.atleast_2d(_as_float64(cov1)), np.atleast_2d(_as_float64(cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"frechet_distance needs means [D] and covariances [D, D] of one D; got {mu1.shape}, {cov1.shape}, "
            f"{mu2.shape}, {cov2.shape}"
        )
    if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, cov1, cov2)):
        return float("inf")  # samples of a diverged model: no finite Gaussian fits them
    try:
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    except np.linalg.LinAlgError:  # newer scipy raises where older versions returned non-finite values
        covmean = np.full_like(cov1, np.nan)
    if not np.all(np.isfinite(covmean)):
        offset = 1e-6 * np.eye(cov1.shape[0])
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean)
    return max(float(distance), 0.0)


@torch.no_grad()
def feature_matrix(images: torch.Tensor, classifier: FeatureClassifier, *, batch_size: int = 500) -> np.ndarray:
    """The classifier's features [N, D] (float64) of images [N, C, H, W], clipped to [-1, 1] first."""
    _check_images(images, classifier.image_shape, minimum=1)
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    chunks = [
        classifier.features(batch.to(device, torch.float32).clamp(-1.0, 1.0)).double().cpu()  # [b, D]
        for batch in images.split(batch_size)
    ]
    classifier.train(was_training)
    return torch.cat(chunks).numpy()  # [N, D]


def _stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of features [N, D] (N >= 2)."""
    if features.shape[0] < 2:
        raise ValueError(f"feature statistics need at least 2 images, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def feature_stats(
    images: torch.Tensor, classifier: FeatureClassifier, *, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of the classifier's features of images [N, C, H, W] in [-1, 1]."""
    _check_images(images, classifier.image_shape)
    return _stats(feature_matrix(images, classifier, batch_size=batch_size))


class FDMetric:
    """Reusable FD-<dataset> evaluator: FD of generated images against the real dataset's feature stats.

    The reference stats are computed once, from all real images (or the first `num_reference` of a fixed
    permutation). FD depends on the generated sample count: compare runs at the same count.
    """

    def __init__(
        self,
        dataset: str,
        *,
        num_reference: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ):
        self.dataset = dataset
        self.classifier, self.classifier_info = get_classifier(dataset, cache_dir=cache_dir, device=device)
        reference = _load_fd_dataset(dataset).images  # [N, C, H, W]
        if num_reference is not None:
            if not 2 <= num_reference <= len(reference):
                raise ValueError(
                    f"num_reference must lie in [2, {len(reference)}] for {dataset!r}, got {num_reference}"
                )
            order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))
            reference = reference[order[:num_reference]]  # [num_reference, C, H, W]
        self.num_reference = len(reference)
        self.reference_mu, self.reference_cov = feature_stats(reference, self.classifier)

    @property
    def name(self) -> str:
        """Metric name for logs, e.g. "FD-digits"."""
        return f"FD-{self.dataset}"

    def __call__(self, images: torch.Tensor) -> float:
        """FD between generated images [N, C, H, W] (clamped to [-1, 1]) and the real reference stats."""
        return self.score_features(self.features(images))

    def features(self, images: torch.Tensor) -> np.ndarray:
        """The classifier's features [N, D] of generated images (a share of them, e.g. one rank's)."""
        return feature_matrix(images, self.classifier)

    def score_features(self, features: np.ndarray) -> float:
        """FD of the generated images whose features [N, D] (N >= 2, gathered from every share) are given."""
        return frechet_distance(*_stats(features), self.reference_mu, self.reference_cov)


def real_vs_real_floor(
    dataset: str, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> float:
    """FD between two disjoint random halves of the real data: the value a perfect generator reaches at N/2 samples."""
    classifier, _ = get_classifier(dataset, cache_dir=cache_dir, device=device)
    images = _load_fd_dataset(dataset).images  # [N, C, H, W]
    first_half, second_half = split_indices(len(images), fraction=0.5, seed=seed)
    return frechet_distance(
        *feature_stats(images[first_half], classifier), *feature_stats(images[second_half], classifier)
    )


def _load_fd_dataset(dataset: str) -> ImageDataset:
    """The real data behind FD-<dataset>; only the built-in datasets have a feature classifier recipe."""
    if dataset not in FD_DATASETS:
        raise ValueError(
            f"FD needs a built-in dataset with a classifier recipe ({', '.join(FD_DATASETS)}); got {dataset!r}"
        )
    return load_dataset(dataset)


def _classifier_path(data: ImageDataset, recipe: ClassifierRecipe, cache_dir: str | os.PathLike | None) -> str:
    """Cache path <cache dir>/classifiers/<dataset>-<hash of architecture, recipe, data>.safetensors."""
    digest = hashlib.sha256()
    architecture = repr(FeatureClassifier(data.image_shape, data.num_classes, recipe))
    identity = {"version": CLASSIFIER_VERSION, "architecture": architecture, "recipe": asdict(recipe)}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    digest.update(data.images.numpy().tobytes())
    digest.update(data.labels.numpy().tobytes())
    root = location(cache_dir, named="--cache-dir") if cache_dir is not None else default_cache_dir()
    return join(root, "classifiers", f"{data.name}-{digest.hexdigest()[:16]}.safetensors")


@contextmanager
def _deterministic_cpu() -> Iterator[None]:
    """One CPU thread and deterministic kernels for the duration; previous settings restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image [B, C, H, W] by a random integer offset in [-max_shift, max_shift]², filling with -1."""
    if max_shift == 0:
        return images
    side = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)  # [B, C, H + 2s, W + 2s]
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)  # [B, 2]
    shifted = torch.empty_like(images)  # [B, C, H, W]
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)  # [B]
            shifted[chosen] = padded[chosen, :, dy : dy + side, dx : dx + side]
    return shifted


def _train_and_cache(
    data: ImageDataset, recipe: ClassifierRecipe, weights_path: str
) -> tuple[FeatureClassifier, dict]:
    """Train the classifier on a fixed split (Adam, cosine lr, random shifts), check accuracy, cache it atomically."""
    start = time.perf_counter()
    train_idx, holdout_idx = split_indices(len(data), fraction=recipe.holdout_fraction, seed=recipe.seed)
    with _deterministic_cpu():
        torch.manual_seed(recipe.seed)
        generator = torch.Generator().manual_seed(recipe.seed)
        classifier = FeatureClassifier(data.image_shape, data.num_classes, recipe)
        optimizer = torch.optim.AdamW(
            classifier.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
        )
        steps_per_epoch = -(-len(train_idx) // recipe.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
        classifier.train()
        for _ in range(recipe.epochs):
            for batch_idx in train_idx[torch.randperm(len(train_idx), generator=generator)].split(recipe.batch_size):
                images = _random_shift(data.images[batch_idx], recipe.max_shift_pixels, generator)  # [B, C, H, W]
                loss = F.cross_entropy(classifier(images), data.labels[batch_idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        classifier.eval()
        with torch.no_grad():
            predictions = classifier(data.images[holdout_idx]).argmax(dim=1)  # [num_holdout]
    accuracy = float((predictions == data.labels[holdout_idx]).double().mean())
    train_seconds = time.perf_counter() - start
    floor = MIN_HOLDOUT_ACCURACY[data.name]
    if accuracy < floor:
        raise RuntimeError(
            f"feature classifier for {data.name!r} reached held-out accuracy {accuracy:.4f} < required {floor}; "
            f"FD-{data.name} would be unreliable, so nothing was cached. Check the recipe in trainer/metrics.py "
            "(RECIPES) or the dataset loader."
        )
    info = {
        "dataset": data.name,
        "accuracy": accuracy,
        "num_train": len(train_idx),
        "num_holdout": len(holdout_idx),
        "train_seconds": train_seconds,
        "classifier_version": CLASSIFIER_VERSION,
        "recipe": asdict(recipe),
    }
    state = {key: value.contiguous() for key, value in classifier.state_dict().items()}
    write_bytes(weights_path, save_safetensors(state, metadata={"classifier_version": CLASSIFIER_VERSION}))
    write_text(weights_path.removesuffix(".safetensors") + ".json", json.dumps(info, indent=2))
    return classifier, info | {"path": weights_path, "trained": True}


def _check_images(images: torch.Tensor, image_shape: tuple[int, int, int], *, minimum: int = 2) -> None:
    """Raise a clear error unless images is a [N, C, H, W] tensor of the classifier's image shape with N >= minimum."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"images must be a tensor [N, {', '.join(map(str, image_shape))}] in [-1, 1] (the dataset's shape); "
            f"got {shape}. Generate at the dataset's resolution or resize before scoring."
        )
    if images.shape[0] < minimum:
        raise ValueError(f"feature statistics need at least {minimum} images, got {images.shape[0]}")


def _as_float64(value) -> np.ndarray:
    """numpy float64 copy of an array-like or tensor."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def fid_inception(
    images: torch.Tensor,
    reference_images: torch.Tensor,
    *,
    weights_path: str | os.PathLike,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> float:
    """Standard FID (Heusel et al. 2017, eq. 6) on InceptionV3 pool features (2048-d), weights from a local file.

    Uses torch-fidelity's TF-compatible InceptionV3 port (`FeatureExtractorInceptionV3`, the network behind
    the published FID numbers) with `feature_extractor_weights_path`; nothing is ever downloaded. The weights
    file is torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, obtained by the user; it is first
    checked to be a plain state dict (`torch.load(weights_only=True)`). Images [N, C, H, W] in [-1, 1] with
    C = 1 or 3 are quantised to uint8 RGB as FID expects; the extractor resizes them to 299×299.

    torch-fidelity imports torchvision at import time, so it needs a torchvision built for the installed
    torch: PyPI's torchvision wheels are built against PyPI's (CUDA) torch and fail to load beside a CPU-only
    torch build. Install both from the same index, then `pip install torch-fidelity`.
    """
    if weights_path is None or not Path(weights_path).expanduser().is_file():
        raise FileNotFoundError(
            f"fid_inception needs weights_path=<local InceptionV3 weights file>, got {weights_path!r} (no such file). "
            "Place torch-fidelity's weights-inception-2015-12-05-6726825d.pth on disk and pass its path; "
            "this project never downloads weights."
        )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise ImportError(
            "fid_inception needs torch-fidelity (`pip install torch-fidelity`) and a torchvision that loads beside "
            f"your torch {torch.__version__} (install torch and torchvision from the same index). "
            f"Import failed: {error}"
        ) from error
    weights_path = Path(weights_path).expanduser()
    try:
        torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{weights_path} is not a plain PyTorch state dict (torch.load(weights_only=True) failed: {error}); "
            "pass torch-fidelity's InceptionV3 .pth weights file"
        ) from error
    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path)
    )
    extractor = extractor.to(device)

    @torch.no_grad()
    def inception_stats(batch_source: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of the 2048-d pool features of images [N, C, H, W] in [-1, 1]."""
        if batch_source.ndim != 4 or batch_source.shape[1] not in (1, 3) or batch_source.shape[0] < 2:
            raise ValueError(
                f"fid_inception needs images [N >= 2, 1 or 3, H, W] in [-1, 1], got {tuple(batch_source.shape)}"
            )
        chunks = []
        for batch in batch_source.split(batch_size):
            rgb = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch  # [B, 3, H, W]
            pixels = ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)  # [B, 3, H, W] in 0..255
            (features,) = extractor(pixels.to(device))  # [B, 2048]
            chunks.append(features.double().cpu())
        features = torch.cat(chunks).numpy()  # [N, 2048]
        return features.mean(axis=0), np.cov(features, rowvar=False)

    return frechet_distance(*inception_stats(images), *inception_stats(reference_images))


def main(argv: list[str] | None = None) -> None:
    """CLI: train or load the feature classifier(s) and print accuracy and the real-vs-real FD floor."""
    import argparse

    parser = argparse.ArgumentParser(description="FD-<dataset> feature classifier: accuracy and real-vs-real floor")
    parser.add_argument("datasets", nargs="+", choices=FD_DATASETS)
    parser.add_argument("--cache-dir", default=None, help="directory or URL (default: $CMT_CACHE_DIR or ~/.cache/cmt-pipeline)")
    parser.add_argument("--seeds", type=int, default=3, help="number of random halvings for the floor")
    args = parser.parse_args(argv)
    for dataset in args.datasets:
        _, info = get_classifier(dataset, cache_dir=args.cache_dir)
        floors = [real_vs_real_floor(dataset, seed=seed, cache_dir=args.cache_dir) for seed in range(args.seeds)]
        print(
            json.dumps(
                {
                    "metric": f"FD-{dataset}",
                    "accuracy": info["accuracy"],
                    "train_seconds": info["train_seconds"],
                    "trained_now": info["trained"],
                    "real_vs_real_floor": floors,
                    "path": info["path"],
                }
            )
        )


if __name__ == "__main__":
    main()
