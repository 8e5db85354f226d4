import shutil

import pytest
import torch

from detector.data.datamodule import ImageFolderDataModule
from detector.data.folders import find_classes, split_indices
from detector.errors import ConfigError, DataError


def _module(root, **kwargs):
    kwargs = {"image_size": 32, "batch_size": 8, "num_workers": 0, **kwargs}
    dm = ImageFolderDataModule(root=str(root), **kwargs)
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_classes_come_from_sorted_folder_names(image_folder):
    assert find_classes(image_folder / "train") == ["FAKE", "REAL"]
    dm = _module(image_folder)
    samples = dm.train_set.samples + dm.val_set.samples
    assert {label for path, label in samples if "/FAKE/" in path} == {0}
    assert {label for path, label in samples if "/REAL/" in path} == {1}


def test_split_is_seeded_disjoint_and_covers_everything(image_folder):
    a, b = _module(image_folder), _module(image_folder)
    train_a = [p for p, _ in a.train_set.samples]
    val_a = [p for p, _ in a.val_set.samples]
    assert train_a == [p for p, _ in b.train_set.samples]
    assert val_a == [p for p, _ in b.val_set.samples]
    assert not set(train_a) & set(val_a)
    assert len(train_a) + len(val_a) == 48
    assert len(val_a) == round(48 * 0.2)
    other = _module(image_folder, seed=7)
    assert [p for p, _ in other.val_set.samples] != val_a


def test_split_indices_fraction_and_determinism():
    train, val = split_indices(1000, 0.2, 123)
    assert len(val) == 200 and len(train) == 800
    assert sorted(train + val) == list(range(1000))
    assert split_indices(1000, 0.2, 123) == (train, val)
    with pytest.raises(ConfigError, match="data.val_fraction=1.5"):
        split_indices(10, 1.5, 0)


def test_batches_are_uint8_at_image_size_with_labels(image_folder):
    dm = _module(image_folder, image_size=40)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.dtype == torch.uint8
    assert images.shape[1:] == (3, 40, 40)
    assert set(labels.tolist()) <= {0, 1}


def test_train_and_test_with_different_classes_is_one_clear_error(image_folder, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(image_folder, root)
    (root / "test" / "REAL").rename(root / "test" / "GENUINE")
    with pytest.raises(DataError, match=r"classes \['FAKE', 'GENUINE'\].*\['FAKE', 'REAL'\]"):
        _module(root)


def test_test_folder_elsewhere_or_none(image_folder, tmp_path):
    dm = ImageFolderDataModule(
        train_dir=str(image_folder / "train"), test_dir=str(image_folder / "test")
    )
    assert dm.has_test
    root = tmp_path / "only_train"
    shutil.copytree(image_folder / "train", root / "train")
    assert not ImageFolderDataModule(root=str(root)).has_test


def test_global_batch_must_divide_by_devices(image_folder):
    dm = _module(image_folder, batch_size=9)

    class TwoDevices:
        world_size = 2

    dm.trainer = TwoDevices()
    with pytest.raises(ConfigError, match="data.batch_size=9.*2 devices"):
        dm.per_device_batch_size()


@pytest.mark.parametrize("name,value", [("image_size", 0), ("batch_size", -4)])
def test_non_positive_sizes_name_the_setting(name, value):
    with pytest.raises(ConfigError, match=f"data.{name}={value}"):
        ImageFolderDataModule(root="x", **{name: value})
