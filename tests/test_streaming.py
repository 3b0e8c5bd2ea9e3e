"""data=image_folder: image files decoded per batch by DataLoader workers (kdresearch.streaming)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, check_ok, experiment_runs, mlflow_client, train_in_process
from PIL import Image

from kdresearch.data.batches import BatchIterator
from kdresearch.data.image_folder import load_image_folder
from kdresearch.data.splits import ImageData
from kdresearch.data.synthetic import make_synthetic
from kdresearch.errors import KDResearchError

CPU = torch.device("cpu")


def write_image_folder(data: ImageData, root) -> ImageData:
    """Write `data` as root/{train,test}/class_<label>/<index>.png; returns the in-memory data in
    the folder's order (by class folder, then file name), which is the order the loader reads."""
    splits = {}
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        order = torch.argsort(labels, stable=True)
        for index in order.tolist():
            folder = root / split / f"class_{labels[index]:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(folder / f"{index:06d}.png")
        splits[split] = (images[order], labels[order])
    return ImageData("synthetic", *splits["train"], *splits["test"], data.classes, data.mean, data.std)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_folder")
    in_memory = write_image_folder(make_synthetic(num_train=80, num_test=30, seed=1), root)
    return root, in_memory


def test_loads_labels_classes_in_folder_order(folder):
    root, in_memory = folder
    data = load_image_folder(str(root), num_workers=0)
    assert data.classes == tuple(f"class_{label:02d}" for label in range(10))
    assert torch.equal(data.train_labels, in_memory.train_labels)
    assert torch.equal(data.test_labels, in_memory.test_labels)
    assert len(data.train_files) == 80 and len(data.test_files) == 30
    limited = load_image_folder(str(root), num_workers=0, limit_train=16, limit_test=8)
    assert (len(limited.train_files), len(limited.test_files)) == (16, 8)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("augment, channels_last", [(False, False), (True, True)])
def test_streamed_batches_equal_in_memory_batches(folder, num_workers, augment, channels_last):
    root, in_memory = folder
    streamed = load_image_folder(str(root), num_workers=num_workers)
    for split, generator_seed in (("train", 5), ("test", None)):
        generators = [torch.Generator().manual_seed(generator_seed) if generator_seed else None for _ in range(2)]
        ours = streamed.batches(split, 16, CPU, generator=generators[0], channels_last=channels_last,
                                augment=augment and split == "train")
        reference = in_memory.batches(split, 16, CPU, generator=generators[1], channels_last=channels_last,
                                      augment=augment and split == "train")
        assert isinstance(reference, BatchIterator) and len(ours) == len(reference)
        for epoch in range(2):  # the generator's state carries over between passes
            pairs = list(zip(ours, reference, strict=True))
            for (images, labels, index), (images_ref, labels_ref, index_ref) in pairs:
                assert torch.equal(index, index_ref) and torch.equal(labels, labels_ref)
                assert torch.equal(images, images_ref)
                assert images.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_fingerprint_follows_file_content(folder, tmp_path):
    root, in_memory = folder
    copy = tmp_path / "copy"
    write_image_folder(make_synthetic(num_train=80, num_test=30, seed=1), copy)
    first = load_image_folder(str(copy)).fingerprint()
    assert load_image_folder(str(copy)).fingerprint() == first == load_image_folder(str(root)).fingerprint()
    image = next((copy / "train" / "class_00").iterdir())
    pixels = Image.open(image).convert("RGB")
    pixels.putpixel((0, 0), tuple(255 - v for v in pixels.getpixel((0, 0))))
    pixels.save(image)
    assert load_image_folder(str(copy)).fingerprint() != first
    # Augmentation is how a job trains (its identity), not what the data holds.
    assert load_image_folder(str(copy), augment=True).fingerprint() == load_image_folder(str(copy)).fingerprint()


def test_bad_folders_fail_with_one_line(tmp_path, folder):
    with pytest.raises(KDResearchError, match="needs data.root=PATH"):
        load_image_folder(None)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "dog").mkdir(parents=True)
    with pytest.raises(KDResearchError, match="test is missing"):
        load_image_folder(str(tmp_path), num_classes=2)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(KDResearchError, match="no images"):
        load_image_folder(str(tmp_path), num_classes=2)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "test" / "cat" / "ok.png").write_bytes((folder[0] / "test" / "class_00").glob("*.png").__next__().read_bytes())
    with pytest.raises(KDResearchError, match="num_workers"):
        load_image_folder(str(tmp_path), num_classes=2, num_workers=-1)
    for workers in (0, 2):
        data = load_image_folder(str(tmp_path), num_classes=2, num_workers=workers)
        with pytest.raises(KDResearchError) as raised:
            list(data.batches("train", 4, CPU))
        message = str(raised.value)
        assert message.startswith("cannot read image") and "broken.png" in message and "\n" not in message


def test_kd_job_on_an_image_folder_uses_the_teacher_cache(folder, tmp_path):
    root, _ = folder
    store = tmp_path / "store"
    check_ok(train_in_process(store, *FAST, "data=image_folder", f"data.root={root}", "loss=kd"))
    runs = experiment_runs(mlflow_client(store))
    assert [run.data.tags["loss"] for run in runs] == ["ce", "kd"]  # teacher trained automatically
    kd = runs[1]
    assert kd.data.tags["teacher_cache"] == "used"
    assert kd.data.params["data.name"] == "image_folder"
    assert 0 <= kd.data.metrics["test/acc"] <= 100
    missing = train_in_process(store, "data=image_folder")
    assert missing.returncode == 1
    assert "error: data=image_folder needs data.root=PATH" in missing.output
    assert "Traceback" not in missing.output
