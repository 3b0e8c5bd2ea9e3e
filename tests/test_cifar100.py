"""data=cifar100 on a generated fixture in the official python layout, and the class-count checks
every loader makes (`data.num_classes`): labels in range, as many images as labels, as many class
folders as classes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from test_data import write_cifar_layout

from kdresearch.data.cifar import CIFAR100_FOLDER, load_cifar10, load_cifar100
from kdresearch.data.image_folder import load_image_folder
from kdresearch.data.splits import ImageData, limit_positions
from kdresearch.data.synthetic import make_synthetic
from kdresearch.errors import KDResearchError

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"
FINE_NAMES = tuple(f"fine_{i:02d}" for i in range(100))
COARSE_NAMES = tuple(f"coarse_{i:02d}" for i in range(20))
TRAIN_COUNT, TEST_COUNT = 40, 20
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def data_file(rng, split: str, count: int, num_classes: int = 100) -> dict:
    """One of CIFAR-100's data files: a pickled dict with the official keys."""
    fine = [int(x) for x in rng.integers(0, num_classes, count)]
    return {
        "filenames": [f"{split}_{i:05d}.png" for i in range(count)],
        "batch_label": f"{split}ing batch 1 of 1",
        "fine_labels": fine,
        "coarse_labels": [label // 5 for label in fine],  # never what we read: fine labels only
        "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
    }


def dump(path: Path, content) -> None:
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


def write_cifar100_layout(root: Path, train_count: int = TRAIN_COUNT, test_count: int = TEST_COUNT,
                          fine_names=FINE_NAMES, seed: int = 0) -> dict:
    """root/cifar-100-python/{train,test,meta} as the official release (and torchvision) has them."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR100_FOLDER
    folder.mkdir(parents=True)
    written = {"train": data_file(rng, "train", train_count, len(fine_names)),
               "test": data_file(rng, "test", test_count, len(fine_names))}
    for name, content in written.items():
        dump(folder / name, content)
    dump(folder / "meta", {"fine_label_names": list(fine_names), "coarse_label_names": list(COARSE_NAMES)})
    return written


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    return root, write_cifar100_layout(root)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(KDResearchError) as raised:
        call(*args, **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


# --- CIFAR-100 ----------------------------------------------------------------------------------

def test_reads_images_fine_labels_and_class_names(fixture_root):
    root, written = fixture_root
    data = load_cifar100(root=str(root), download=False, verify=False)
    assert isinstance(data, ImageData) and data.name == "cifar100"
    assert data.train_images.shape == (TRAIN_COUNT, 3, 32, 32) and data.test_images.shape == (TEST_COUNT, 3, 32, 32)
    assert data.train_images.dtype == data.test_images.dtype == torch.uint8
    assert data.train_labels.dtype == data.test_labels.dtype == torch.int64
    assert data.classes == FINE_NAMES and data.num_classes == 100
    assert (data.mean, data.std) == (CIFAR100_MEAN, CIFAR100_STD)
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        assert np.array_equal(images.numpy().reshape(len(images), 3072), written[split]["data"])
        assert labels.tolist() == written[split]["fine_labels"] != written[split]["coarse_labels"]
    # channel-major rows: the first 1024 bytes are the red plane
    assert np.array_equal(data.train_images[0, 0].numpy().ravel(), written["train"]["data"][0, :1024])


def test_agrees_with_torchvision_reader(fixture_root, monkeypatch):
    from torchvision.datasets import CIFAR100

    root, _ = fixture_root
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)  # no official md5s
    data = load_cifar100(root=str(root), download=False, verify=False)
    for train, images, labels in ((True, data.train_images, data.train_labels), (False, data.test_images, data.test_labels)):
        reference = CIFAR100(root=str(root), train=train, download=False)
        assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), reference.data)
        assert labels.tolist() == list(reference.targets)
        assert data.classes == tuple(reference.classes)


def test_limits_take_images_drawn_across_classes(fixture_root):
    root, _ = fixture_root
    full = load_cifar100(root=str(root), download=False, verify=False)
    data = load_cifar100(root=str(root), download=False, verify=False, limit_train=7, limit_test=5)
    assert data.train_images.shape == (7, 3, 32, 32) and data.test_images.shape == (5, 3, 32, 32)
    train, test = limit_positions(full.train_labels, 7, "limit_train"), limit_positions(full.test_labels, 5, "limit_test")
    assert torch.equal(data.train_images, full.train_images[train]) and torch.equal(data.train_labels, full.train_labels[train])
    assert torch.equal(data.test_images, full.test_images[test]) and torch.equal(data.test_labels, full.test_labels[test])
    assert data.num_classes == 100


def test_verify_refuses_unofficial_files(fixture_root):
    root, _ = fixture_root
    message = one_line_error(load_cifar100, root=str(root), download=False, verify=True)
    assert message.startswith("CIFAR-100 files in") and "md5" in message and "data.verify=false" in message
    assert "(train, test)" in message and CIFAR100_FOLDER in message


def test_missing_folder_names_the_files_and_options(tmp_path):
    message = one_line_error(load_cifar100, root=str(tmp_path / "nowhere"), download=False)
    assert message.startswith("CIFAR-100 not found") and "lacks train, test, meta." in message
    for option in ("data.download=true", "data.root=PATH", "data=synthetic", CIFAR100_FOLDER):
        assert option in message


def test_meta_is_required(tmp_path):
    write_cifar100_layout(tmp_path, train_count=2, test_count=2)
    (tmp_path / CIFAR100_FOLDER / "meta").unlink()
    assert "lacks meta." in one_line_error(load_cifar100, root=str(tmp_path), download=False, verify=False)


def test_conf_data_cifar100_instantiates(fixture_root):
    root, written = fixture_root
    cfg = OmegaConf.load(CONF_DATA / "cifar100.yaml")
    assert cfg.name == "cifar100" and cfg.num_classes == 100
    assert (tuple(cfg.mean), tuple(cfg.std)) == (CIFAR100_MEAN, CIFAR100_STD)
    params = OmegaConf.to_container(OmegaConf.merge(cfg, {"root": str(root), "download": False, "verify": False}))
    params.pop("name")  # the trainer drops the short name before instantiating
    data = instantiate(params)
    assert isinstance(data, ImageData) and data.name == "cifar100" and data.num_classes == 100
    assert (data.mean, data.std) == (CIFAR100_MEAN, CIFAR100_STD)
    assert data.train_labels.tolist() == written["train"]["fine_labels"]


def test_not_a_data_file_names_cifar100(tmp_path):
    write_cifar100_layout(tmp_path, train_count=2, test_count=2)
    (tmp_path / CIFAR100_FOLDER / "test").write_bytes(b"not a pickle")
    message = one_line_error(load_cifar100, root=str(tmp_path), download=False, verify=False)
    assert "is not a CIFAR-100 python data file" in message and "CIFAR-10 " not in message


def test_a_data_file_without_fine_labels_is_named(tmp_path):
    write_cifar100_layout(tmp_path, train_count=2, test_count=2)
    content = data_file(np.random.default_rng(0), "train", 2)
    content["labels"] = content.pop("fine_labels")  # CIFAR-10's key
    dump(tmp_path / CIFAR100_FOLDER / "train", content)
    message = one_line_error(load_cifar100, root=str(tmp_path), download=False, verify=False)
    assert "train is not a CIFAR-100 python data file" in message and "'fine_labels'" in message


def test_files_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    write_cifar100_layout(tmp_path, train_count=2, test_count=2)
    dump(tmp_path / CIFAR100_FOLDER / "meta", Evil())
    one_line_error(load_cifar100, root=str(tmp_path), download=False, verify=False)
    assert not (tmp_path / "pwned").exists()


def test_label_out_of_range_is_refused(tmp_path):
    written = write_cifar100_layout(tmp_path, train_count=4, test_count=4)
    written["test"]["fine_labels"][2] = 100
    dump(tmp_path / CIFAR100_FOLDER / "test", written["test"])
    message = one_line_error(load_cifar100, root=str(tmp_path), download=False, verify=False)
    assert str(tmp_path / CIFAR100_FOLDER / "test") in message and "label 100" in message
    assert "data.num_classes=100" in message


def test_label_15_in_a_10_class_set(tmp_path):
    written = write_cifar100_layout(tmp_path, train_count=4, test_count=4, fine_names=FINE_NAMES[:10])
    written["train"]["fine_labels"][0] = 15
    dump(tmp_path / CIFAR100_FOLDER / "train", written["train"])
    message = one_line_error(load_cifar100, root=str(tmp_path), download=False, verify=False, num_classes=10)
    assert "label 15" in message and "[0, 10)" in message and str(tmp_path / CIFAR100_FOLDER / "train") in message


def test_images_labels_count_mismatch_is_refused(tmp_path):
    write_cifar100_layout(tmp_path, train_count=2, test_count=2)
    content = data_file(np.random.default_rng(1), "train", 300)
    content["fine_labels"] = content["fine_labels"][:50]
    dump(tmp_path / CIFAR100_FOLDER / "train", content)
    message = one_line_error(load_cifar100, root=str(tmp_path), download=False, verify=False)
    assert "300 images but 50 labels" in message and str(tmp_path / CIFAR100_FOLDER / "train") in message


def test_meta_class_count_must_equal_num_classes(fixture_root):
    root, _ = fixture_root
    message = one_line_error(load_cifar100, root=str(root), download=False, verify=False, num_classes=10)
    assert "names 100 classes" in message and "data.num_classes=10" in message
    assert "set data.num_classes=100" in message


# --- CIFAR-10: the same checks ------------------------------------------------------------------

def rewrite_cifar10_batch(root: Path, name: str, change) -> None:
    path = root / "cifar-10-batches-py" / name
    with open(path, "rb") as handle:
        batch = pickle.load(handle)
    change(batch)
    dump(path, batch)


def test_cifar10_label_out_of_range_is_refused(tmp_path):
    write_cifar_layout(tmp_path, per_batch=3, test_count=3)
    rewrite_cifar10_batch(tmp_path, "data_batch_3", lambda batch: batch["labels"].__setitem__(1, 15))
    message = one_line_error(load_cifar10, root=str(tmp_path), download=False, verify=False)
    assert "data_batch_3" in message and "label 15" in message and "data.num_classes=10" in message


def test_cifar10_negative_label_is_refused(tmp_path):
    write_cifar_layout(tmp_path, per_batch=3, test_count=3)
    rewrite_cifar10_batch(tmp_path, "test_batch", lambda batch: batch["labels"].__setitem__(0, -1))
    message = one_line_error(load_cifar10, root=str(tmp_path), download=False, verify=False)
    assert "test_batch" in message and "label -1" in message


def test_cifar10_images_labels_count_mismatch_is_refused(tmp_path):
    write_cifar_layout(tmp_path, per_batch=3, test_count=3)

    def more_images(batch):
        batch["data"] = np.zeros((300, 3072), dtype=np.uint8)
        batch["labels"] = [0] * 50

    rewrite_cifar10_batch(tmp_path, "data_batch_2", more_images)
    message = one_line_error(load_cifar10, root=str(tmp_path), download=False, verify=False)
    assert "data_batch_2" in message and "300 images but 50 labels" in message


def test_cifar10_num_classes(tmp_path):
    write_cifar_layout(tmp_path, per_batch=3, test_count=3, meta=False)
    assert load_cifar10(root=str(tmp_path), download=False, verify=False).num_classes == 10
    message = one_line_error(load_cifar10, root=str(tmp_path), download=False, verify=False, num_classes=20)
    assert "CIFAR-10 has 10 classes" in message and "set data.num_classes=10" in message


# --- num_classes everywhere ---------------------------------------------------------------------

def test_every_data_config_has_num_classes():
    expected = {"cifar10": 10, "cifar100": 100, "synthetic": 10, "image_folder": 10}
    configs = {path.stem: OmegaConf.load(path) for path in CONF_DATA.glob("*.yaml")}
    assert set(configs) >= set(expected)
    for option, cfg in configs.items():
        assert "num_classes" in cfg, f"conf/data/{option}.yaml has no num_classes"
        assert cfg.num_classes == expected.get(option, cfg.num_classes)


@pytest.mark.parametrize("num_classes", [1, 0, 2.5, True, "10"])
def test_bad_num_classes_are_refused(fixture_root, num_classes):
    root, _ = fixture_root
    # Synthetic data also bounds the classes by its training images (one image per class at least).
    assert one_line_error(lambda: make_synthetic(num_train=8, num_test=4, num_classes=num_classes)).startswith(
        "data.num_classes must be an integer in [2, 8] (data.num_train: one class per training image at most)")
    assert "data.num_classes must be an integer >= 2" in one_line_error(
        lambda: load_cifar100(root=str(root), download=False, verify=False, num_classes=num_classes))


def test_synthetic_num_classes():
    data = make_synthetic(num_train=30, num_test=10, num_classes=3)
    assert data.num_classes == 3 == len(data.classes)
    assert int(data.train_labels.max()) < 3


def write_png_folders(root: Path, classes: int) -> None:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    for split in ("train", "test"):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            Image.fromarray(pixels + label).save(folder / "0.png")


def test_image_folder_class_count_must_equal_num_classes(tmp_path):
    write_png_folders(tmp_path, classes=3)
    message = one_line_error(load_image_folder, str(tmp_path), num_workers=0)  # data.num_classes: 10
    assert "has 3 class folders" in message and "data.num_classes=10" in message
    assert "set data.num_classes=3" in message and str(tmp_path / "train") in message
    data = load_image_folder(str(tmp_path), num_classes=3, num_workers=0)
    assert data.num_classes == 3 and data.classes == ("class_0", "class_1", "class_2")
    assert data.train_labels.tolist() == [0, 1, 2]


def test_image_folder_with_one_class_folder(tmp_path):
    write_png_folders(tmp_path, classes=1)
    message = one_line_error(load_image_folder, str(tmp_path), num_classes=2, num_workers=0)
    assert "has 1 class folders" in message and "at least 2 classes" in message
