"""Tests for trainer/metrics.py: Fréchet distance, the cached feature classifier, FD-digits, FID guards."""

import dataclasses
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import metrics
from trainer.image_datasets import load_dataset, split_indices
from trainer.metrics import (
    FDMetric,
    FeatureClassifier,
    feature_stats,
    fid_inception,
    frechet_distance,
    get_classifier,
    real_vs_real_floor,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    """A cache dir holding the digits classifier, trained once for this module."""
    cache_dir = tmp_path_factory.mktemp("cmt-cache")
    get_classifier("digits", cache_dir=cache_dir)
    return cache_dir


@pytest.fixture(scope="module")
def digits_metric(digits_cache) -> FDMetric:
    return FDMetric("digits", cache_dir=digits_cache)


def test_frechet_distance_matches_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_and_zero_for_equal_stats():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    forward, backward = frechet_distance(mu1, cov1, mu2, cov2), frechet_distance(mu2, cov2, mu1, cov1)
    assert forward > 0
    assert forward == pytest.approx(backward, rel=1e-8)
    assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_accepts_tensors_and_rejects_mismatched_shapes():
    mu, cov = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mu, cov, mu + 1.0, 4.0 * cov) == pytest.approx(3.0 + 3.0, rel=1e-9)
    with pytest.raises(ValueError, match="D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_classifier_reaches_required_holdout_accuracy(digits_cache):
    classifier, info = get_classifier("digits", cache_dir=digits_cache)
    assert isinstance(classifier, FeatureClassifier)
    recipe = metrics.RECIPES["digits"]
    data = load_dataset("digits")
    _, holdout_idx = split_indices(len(data), fraction=recipe.holdout_fraction, seed=recipe.seed)
    with torch.no_grad():
        predictions = classifier(data.images[holdout_idx]).argmax(dim=1)
    accuracy = (predictions == data.labels[holdout_idx]).double().mean().item()
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(info["accuracy"])
    assert classifier.features(data.images[:5]).shape == (5, recipe.feature_dim)


def test_second_call_loads_cache_without_retraining(digits_cache):
    _, first_info = get_classifier("digits", cache_dir=digits_cache)
    weights_path = Path(first_info["path"])
    assert weights_path.suffix == ".safetensors"
    assert weights_path.parent == digits_cache / "classifiers"
    assert weights_path.with_suffix(".json").is_file()
    mtime_before = weights_path.stat().st_mtime_ns
    _, second_info = get_classifier("digits", cache_dir=digits_cache)
    assert second_info["trained"] is False
    assert second_info["accuracy"] == first_info["accuracy"]
    assert weights_path.stat().st_mtime_ns == mtime_before


def test_training_is_deterministic_across_cache_dirs(digits_cache, tmp_path):
    _, cached_info = get_classifier("digits", cache_dir=digits_cache)
    _, fresh_info = get_classifier("digits", cache_dir=tmp_path)
    assert fresh_info["trained"] is True
    cached_bytes = Path(cached_info["path"]).read_bytes()
    fresh_bytes = Path(fresh_info["path"]).read_bytes()
    assert hashlib.sha256(cached_bytes).hexdigest() == hashlib.sha256(fresh_bytes).hexdigest()


def test_training_below_accuracy_floor_fails_loudly_and_caches_nothing(tmp_path, monkeypatch):
    untrained = dataclasses.replace(metrics.RECIPES["digits"], epochs=0)
    monkeypatch.setitem(metrics.RECIPES, "digits", untrained)
    with pytest.raises(RuntimeError, match="accuracy"):
        get_classifier("digits", cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_cached_classifier_loads_from_a_url_cache_dir(digits_cache):
    import uuid

    import fsspec

    root, fs = f"memory://fd-cache-{uuid.uuid4().hex}", fsspec.filesystem("memory")
    for file in (digits_cache / "classifiers").iterdir():
        fs.pipe_file(f"{root.removeprefix('memory://')}/classifiers/{file.name}", file.read_bytes())
    remote, info = get_classifier("digits", cache_dir=root)
    local, _ = get_classifier("digits", cache_dir=digits_cache)
    assert not info["trained"] and info["path"].startswith(f"{root}/classifiers/digits-")
    assert all(torch.equal(remote.state_dict()[k], v) for k, v in local.state_dict().items())
    fs.rm(root.removeprefix("memory://"), recursive=True)


def test_cache_dir_defaults_to_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CMT_CACHE_DIR", str(tmp_path))
    assert metrics.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("CMT_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert metrics.default_cache_dir() == str(Path("~/.cache/cmt-pipeline").expanduser())


def test_fd_orders_real_noisy_and_pure_noise(digits_metric):
    recipe = metrics.RECIPES["digits"]
    data = load_dataset("digits")
    _, holdout_idx = split_indices(len(data), fraction=recipe.holdout_fraction, seed=recipe.seed)
    real = data.images[holdout_idx]  # [359, 1, 8, 8]
    generator = torch.Generator().manual_seed(0)
    noisy = (real + 0.8 * torch.randn(real.shape, generator=generator)).clamp(-1.0, 1.0)
    pure_noise = torch.rand(real.shape, generator=generator) * 2.0 - 1.0
    fd_real, fd_noisy, fd_noise = digits_metric(real), digits_metric(noisy), digits_metric(pure_noise)
    assert digits_metric.name == "FD-digits"
    assert fd_real < fd_noisy < fd_noise


def test_fd_clamps_images_and_rejects_wrong_shapes(digits_metric):
    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3.0
    assert digits_metric(images) == pytest.approx(digits_metric(images.clamp(-1.0, 1.0)))
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        digits_metric(torch.zeros(16, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        feature_stats(torch.zeros(16, 8, 8), digits_metric.classifier)


def test_fd_from_features_gathered_from_shares_equals_fd_of_all_images(digits_metric):
    """Evaluation spreads images over ranks and gathers features: FD from the joined shares is FD of all images."""
    images = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2.0 - 1.0
    shares = [digits_metric.features(part) for part in images.split([20, 20, 8])]
    assert digits_metric.score_features(np.concatenate(shares)) == pytest.approx(digits_metric(images), rel=1e-9)


def test_real_vs_real_floor_is_positive_and_below_noise(digits_cache, digits_metric):
    floor = real_vs_real_floor("digits", seed=0, cache_dir=digits_cache)
    assert floor > 0
    assert floor == real_vs_real_floor("digits", seed=0, cache_dir=digits_cache)
    pure_noise = torch.rand(898, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2.0 - 1.0
    assert floor < digits_metric(pure_noise)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="digits, mnist"):
        get_classifier("cifar10", cache_dir=tmp_path)


def test_fid_inception_requires_a_local_weights_file(tmp_path):
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        fid_inception(images, images, weights_path=tmp_path / "absent.pth")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_fid_inception_without_torch_fidelity_names_the_install(tmp_path):
    weights_path = tmp_path / "inception.pth"
    torch.save({}, weights_path)
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        fid_inception(images, images, weights_path=weights_path)


@pytest.mark.slow
def test_mnist_classifier_accuracy_and_floor(tmp_path):
    _, info = get_classifier("mnist", cache_dir=tmp_path)
    assert info["accuracy"] >= metrics.MIN_HOLDOUT_ACCURACY["mnist"]
    assert real_vs_real_floor("mnist", cache_dir=tmp_path) > 0


def test_frechet_distance_of_non_finite_statistics_is_infinite_not_an_error():
    """A diverged student's features have no finite Gaussian; the study must record that, not crash in sqrtm."""
    import numpy as np

    from trainer.metrics import frechet_distance

    assert frechet_distance(np.zeros(3), np.eye(3), np.ones(3), np.full((3, 3), np.inf)) == float("inf")
    assert frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) < 1e-9
