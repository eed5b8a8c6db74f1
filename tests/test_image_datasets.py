"""Tests for trainer/image_datasets.py: shapes, ranges, labels, splits and the image-folder loader."""

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.image_datasets import ImageDataset, load_dataset, split_indices

torch.set_num_threads(1)


def test_digits_shapes_ranges_and_labels():
    dataset = load_dataset("digits")
    assert isinstance(dataset, ImageDataset)
    assert dataset.images.shape == (1797, 1, 8, 8)
    assert dataset.images.dtype == torch.float32
    assert dataset.labels.dtype == torch.int64
    assert dataset.images.min().item() == -1.0
    assert dataset.images.max().item() == 1.0
    assert dataset.num_classes == 10
    counts = torch.bincount(dataset.labels, minlength=10)
    assert counts.sum().item() == 1797
    assert counts.min().item() >= 170  # every digit class is present in roughly equal numbers


def test_digits_grey_levels_map_linearly():
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images.astype(np.float32))  # [1797, 8, 8] in [0, 16]
    dataset = load_dataset("digits")
    torch.testing.assert_close(dataset.images[:, 0], raw / 8.0 - 1.0)


def test_mnist_is_padded_to_32_with_background():
    dataset = load_dataset("mnist")
    assert dataset.images.shape == (5000, 1, 32, 32)
    assert dataset.num_classes == 10
    assert torch.bincount(dataset.labels).tolist() == [500] * 10
    border = torch.cat([dataset.images[..., :2, :].flatten(), dataset.images[..., -2:, :].flatten()])
    assert torch.all(border == -1.0)
    assert dataset.images.min().item() == -1.0
    assert dataset.images.max().item() == 1.0


def test_image_size_resizes_builtin_dataset():
    dataset = load_dataset("digits", image_size=16)
    assert dataset.images.shape == (1797, 1, 16, 16)
    assert dataset.images.abs().max().item() <= 1.0


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="digits.*mnist.*folder"):
        load_dataset("cifar10")


def _write_png(path, color, size):
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(path)


def test_folder_without_classes(tmp_path):
    for index, color in enumerate([0, 128, 255]):
        _write_png(tmp_path / f"image{index}.png", color, 12)
    dataset = load_dataset(f"folder:{tmp_path}", image_size=6)
    assert dataset.images.shape == (3, 3, 6, 6)
    assert dataset.num_classes == 1
    assert dataset.labels.tolist() == [0, 0, 0]
    assert dataset.images[0].max().item() == -1.0  # black → -1
    assert dataset.images[2].min().item() == 1.0  # white → +1


def test_folder_with_class_subfolders(tmp_path):
    for class_name, count in [("cats", 2), ("dogs", 1)]:
        (tmp_path / class_name).mkdir()
        for index in range(count):
            _write_png(tmp_path / class_name / f"{index}.png", 40 * index, 8)
    dataset = load_dataset(f"folder:{tmp_path}")
    assert dataset.images.shape == (3, 3, 8, 8)
    assert dataset.num_classes == 2
    assert dataset.labels.tolist() == [0, 0, 1]


def test_folder_with_mixed_sizes_asks_for_image_size(tmp_path):
    _write_png(tmp_path / "a.png", 0, 8)
    _write_png(tmp_path / "b.png", 0, 9)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset(f"folder:{tmp_path}")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'absent'}")


def test_split_indices_is_deterministic_disjoint_and_complete():
    train_a, holdout_a = split_indices(1797, fraction=0.2, seed=3)
    train_b, holdout_b = split_indices(1797, fraction=0.2, seed=3)
    assert torch.equal(train_a, train_b) and torch.equal(holdout_a, holdout_b)
    assert len(holdout_a) == round(1797 * 0.2)
    assert sorted(torch.cat([train_a, holdout_a]).tolist()) == list(range(1797))
    _, holdout_other_seed = split_indices(1797, fraction=0.2, seed=4)
    assert not torch.equal(holdout_a, holdout_other_seed)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_indices_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        split_indices(10, fraction=fraction, seed=0)
