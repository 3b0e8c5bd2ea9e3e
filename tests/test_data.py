"""CIFAR-10 loading (a generated fixture in the real pickle layout, and the real 10k sample when
present), the synthetic dataset, and BatchIterator's normalisation and seeded order."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from kdresearch.data.batches import BatchIterator
from kdresearch.data.cifar import CIFAR10_CLASSES, load_cifar10
from kdresearch.data.splits import limit_positions
from kdresearch.data.synthetic import make_synthetic
from kdresearch.errors import KDResearchError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
PER_BATCH, TEST_COUNT = 20, 30


def write_cifar_layout(root: Path, per_batch: int = PER_BATCH, test_count: int = TEST_COUNT,
                       label_names=CIFAR10_CLASSES, meta: bool = True, seed: int = 0) -> dict:
    """The official python layout: root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta},
    each a pickled dict with 'data' (uint8, N x 3072, channel-major), 'labels', 'batch_label', 'filenames'."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for index, name in enumerate(FILES):
        count = test_count if name == "test_batch" else per_batch
        batch = {
            "batch_label": "testing batch 1 of 1" if name == "test_batch" else f"training batch {index + 1} of 5",
            "labels": [int(x) for x in rng.integers(0, len(label_names), count)],
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i:05d}.png" for i in range(count)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        written[name] = batch
    if meta:
        with open(folder / "batches.meta", "wb") as handle:
            pickle.dump({"label_names": list(label_names), "num_cases_per_batch": per_batch, "num_vis": 3072},
                        handle, protocol=2)
    return written


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar_layout(root)


def normalise_like_torchvision(images_uint8: torch.Tensor) -> torch.Tensor:
    """The tutorial's ToTensor() + Normalize(mean, std), per image, on HWC uint8 arrays."""
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=list(MEAN), std=list(STD))])
    return torch.stack([pipeline(image.permute(1, 2, 0).numpy()) for image in images_uint8])


# --- CIFAR-10 on a generated fixture --------------------------------------------------------------

def test_fixture_loads_in_order(fixture_root):
    root, written = fixture_root
    data = load_cifar10(root=str(root), download=False, verify=False)
    assert data.name == "cifar10"
    assert data.train_images.shape == (5 * PER_BATCH, 3, 32, 32)
    assert data.test_images.shape == (TEST_COUNT, 3, 32, 32)
    assert data.train_images.dtype == data.test_images.dtype == torch.uint8
    assert data.train_labels.dtype == data.test_labels.dtype == torch.int64
    assert data.train_labels.shape == (5 * PER_BATCH,) and data.test_labels.shape == (TEST_COUNT,)
    assert 0 <= int(data.train_labels.min()) and int(data.train_labels.max()) <= 9
    assert data.classes == CIFAR10_CLASSES
    assert (data.mean, data.std) == (MEAN, STD)
    raw_train = np.concatenate([written[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    raw_labels = [label for i in range(1, 6) for label in written[f"data_batch_{i}"]["labels"]]
    assert np.array_equal(data.train_images.numpy(), raw_train.reshape(-1, 3, 32, 32))
    assert data.train_labels.tolist() == raw_labels
    assert np.array_equal(data.test_images.numpy().reshape(TEST_COUNT, 3072), written["test_batch"]["data"])
    assert data.test_labels.tolist() == written["test_batch"]["labels"]
    # Channel-major rows: the first 1024 bytes are the red plane.
    assert np.array_equal(data.train_images[0, 0].numpy().ravel(), raw_train[0, :1024])


def test_fixture_matches_torchvision_reader(fixture_root, monkeypatch):
    from torchvision.datasets import CIFAR10

    root, _ = fixture_root
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)  # no official md5s
    data = load_cifar10(root=str(root), download=False, verify=False)
    for train, images, labels in ((True, data.train_images, data.train_labels), (False, data.test_images, data.test_labels)):
        reference = CIFAR10(root=str(root), train=train, download=False)
        assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), reference.data)
        assert labels.tolist() == list(reference.targets)


def test_class_names_come_from_batches_meta(tmp_path):
    names = tuple(f"class_{i}" for i in range(10))
    write_cifar_layout(tmp_path, per_batch=2, test_count=2, label_names=names)
    assert load_cifar10(root=str(tmp_path), download=False, verify=False).classes == names


def test_without_meta_the_official_names_are_used(tmp_path):
    write_cifar_layout(tmp_path, per_batch=2, test_count=2, meta=False)
    assert load_cifar10(root=str(tmp_path), download=False, verify=False).classes == CIFAR10_CLASSES


def test_limits_take_images_drawn_across_classes(fixture_root):
    root, _ = fixture_root
    full = load_cifar10(root=str(root), download=False, verify=False)
    data = load_cifar10(root=str(root), download=False, verify=False, limit_train=7, limit_test=5)
    assert data.train_images.shape == (7, 3, 32, 32) and data.test_images.shape == (5, 3, 32, 32)
    kept = limit_positions(full.train_labels, 7, "limit_train")
    assert torch.equal(data.train_images, full.train_images[kept])
    assert torch.equal(data.test_labels, full.test_labels[limit_positions(full.test_labels, 5, "limit_test")])
    assert data.fingerprint() != full.fingerprint()


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limits_are_refused(fixture_root, limit):
    root, _ = fixture_root
    with pytest.raises(KDResearchError, match="data.limit_train must be an integer >= 1 or null"):
        load_cifar10(root=str(root), download=False, verify=False, limit_train=limit)


def test_verify_refuses_unofficial_files(fixture_root):
    root, _ = fixture_root
    with pytest.raises(KDResearchError) as raised:
        load_cifar10(root=str(root), download=False, verify=True)
    message = str(raised.value)
    assert "md5" in message and "data.verify=false" in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "\n" not in message


def test_missing_files_name_the_options(tmp_path):
    with pytest.raises(KDResearchError) as raised:
        load_cifar10(root=str(tmp_path / "nowhere"), download=False)
    message = str(raised.value)
    assert "CIFAR-10 not found" in message
    for option in ("data.download=true", "data.root=PATH", "data=synthetic", "cifar-10-batches-py"):
        assert option in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "\n" not in message


def test_one_missing_file_is_named(tmp_path):
    write_cifar_layout(tmp_path, per_batch=2, test_count=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(KDResearchError, match="lacks test_batch\\."):
        load_cifar10(root=str(tmp_path), download=False, verify=False)


# --- the real 10k sample in ../shared/data ------------------------------------------------------

@pytest.fixture(scope="module")
def real_data(shared_cifar):
    return load_cifar10(root=str(shared_cifar), download=False, verify=False)


def test_real_sample_shapes_and_classes(real_data):
    data = real_data
    assert data.train_images.shape == (10_000, 3, 32, 32) and data.test_images.shape == (2_000, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert torch.bincount(data.train_labels, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(data.test_labels, minlength=10).tolist() == [200] * 10
    # real photos, not noise: neighbouring pixels are strongly correlated
    image = data.train_images[:200].float()
    assert (image[..., 1:] - image[..., :-1]).abs().mean() < 0.5 * (image - image.mean()).abs().mean()


def test_real_sample_matches_torchvision_reader(shared_cifar, real_data, monkeypatch):
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)  # re-encoded: md5 differs
    reference = CIFAR10(root=str(shared_cifar), train=False, download=False)
    assert np.array_equal(real_data.test_images.permute(0, 2, 3, 1).numpy(), reference.data)
    assert real_data.test_labels.tolist() == list(reference.targets)


def test_real_sample_limits(shared_cifar, real_data):
    data = load_cifar10(root=str(shared_cifar), download=False, verify=False, limit_train=500, limit_test=100)
    assert len(data.train_labels) == 500 and len(data.test_labels) == 100
    assert torch.equal(data.train_images, real_data.train_images[limit_positions(real_data.train_labels, 500, "limit_train")])


def test_real_sample_fails_verification(shared_cifar):
    with pytest.raises(KDResearchError, match="data.verify=false"):
        load_cifar10(root=str(shared_cifar), download=False, verify=True)


def test_real_sample_normalisation_equals_torchvision(real_data):
    images, labels = real_data.test_images[:64], real_data.test_labels[:64]
    batches = BatchIterator(images, labels, real_data, batch_size=64, device=torch.device("cpu"))
    (batch, batch_labels, _), = list(batches)
    torch.testing.assert_close(batch, normalise_like_torchvision(images), rtol=0, atol=1e-5)
    assert torch.equal(batch_labels, labels)


# --- synthetic ----------------------------------------------------------------------------------

def test_synthetic_is_deterministic():
    torch.manual_seed(1)
    first = make_synthetic(num_train=200, num_test=50)
    torch.manual_seed(999)  # the training seed must not change the data
    second = make_synthetic(num_train=200, num_test=50)
    for a, b in ((first.train_images, second.train_images), (first.train_labels, second.train_labels),
                 (first.test_images, second.test_images), (first.test_labels, second.test_labels)):
        assert torch.equal(a, b)
    assert first.fingerprint() == second.fingerprint()
    other = make_synthetic(num_train=200, num_test=50, seed=1)
    assert not torch.equal(first.train_images, other.train_images)
    assert first.fingerprint() != other.fingerprint()


def test_synthetic_shapes_and_limits():
    data = make_synthetic(num_train=100, num_test=40, limit_train=30, limit_test=10)
    assert data.name == "synthetic"
    assert data.train_images.shape == (30, 3, 32, 32) and data.test_images.shape == (10, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert len(data.classes) == 10
    assert 0 <= int(data.train_labels.min()) and int(data.train_labels.max()) < 10
    full = make_synthetic(num_train=100, num_test=40)
    # limits pick images of the full set, drawn across the classes
    assert torch.equal(data.train_images, full.train_images[limit_positions(full.train_labels, 30, "limit_train")])


def test_synthetic_default_size():
    data = make_synthetic()
    assert len(data.train_labels) == 2000 and len(data.test_labels) == 500
    assert torch.bincount(data.train_labels, minlength=10).min() > 100  # every class present


# --- BatchIterator ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    return make_synthetic(num_train=100, num_test=20)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalisation_equals_torchvision(small, channels_last):
    batches = BatchIterator(small.train_images, small.train_labels, small, batch_size=32,
                            device=torch.device("cpu"), channels_last=channels_last)
    assert len(batches) == 4
    seen = 0
    for images, labels, index in batches:
        assert images.dtype == torch.float32
        torch.testing.assert_close(images, normalise_like_torchvision(small.train_images[index]), rtol=0, atol=1e-5)
        assert torch.equal(labels, small.train_labels[index])
        seen += len(labels)
    assert seen == 100


def test_evaluation_order_is_the_stored_order(small):
    batches = BatchIterator(small.test_images, small.test_labels, small, batch_size=8, device=torch.device("cpu"))
    indices = [index for _, _, index in batches]
    assert [len(i) for i in indices] == [8, 8, 4]
    assert torch.cat(indices).tolist() == list(range(20))
    assert torch.cat([index for _, _, index in batches]).tolist() == list(range(20))


def order(data, seed, passes=2, batch_size=16):
    batches = BatchIterator(data.train_images, data.train_labels, data, batch_size=batch_size,
                            device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
    return [torch.cat([index for _, _, index in batches]).tolist() for _ in range(passes)]


def test_seeded_shuffling_is_reproducible(small):
    first, second = order(small, 42), order(small, 42)
    assert first == second
    for one_pass in first:
        assert sorted(one_pass) == list(range(100))  # every image once per pass
    assert first[0] != list(range(100))  # shuffled
    assert first[0] != first[1]  # a new order each pass
    assert order(small, 7) != first
    torch.manual_seed(0)
    again = order(small, 42)
    assert again == first  # the global RNG plays no part


def test_shuffled_batches_carry_matching_images_and_labels(small):
    batches = BatchIterator(small.train_images, small.train_labels, small, batch_size=30,
                            device=torch.device("cpu"), generator=torch.Generator().manual_seed(3))
    for images, labels, index in batches:
        assert torch.equal(labels, small.train_labels[index])
        torch.testing.assert_close(images, normalise_like_torchvision(small.train_images[index]), rtol=0, atol=1e-5)
