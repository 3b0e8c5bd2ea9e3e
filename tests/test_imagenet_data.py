"""data=imagenet (ImageFolder layout, streamed with the standard transforms), data=tiny_imagenet (its
release layout, in memory), the sampled folder fingerprint and the ImageNet recipe presets."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, check_ok, experiment_runs, mlflow_client, train_in_process
from kdresearch.data.image_folder import ImageFolderData
from kdresearch.data.imagenet import RandomResizedCropFlip, ResizeCenterCrop, load_imagenet
from kdresearch.data.tiny_imagenet import load_tiny_imagenet
from kdresearch.errors import KDResearchError

CPU = torch.device("cpu")
WNIDS = ("n01440764", "n01443537", "n01484850")
SIZES = ((50, 40), (37, 61), (80, 80), (64, 48))  # mixed sizes and aspect ratios, as ImageNet's


def texture(size: tuple[int, int], seed: int) -> Image.Image:
    generator = np.random.default_rng(seed)
    return Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory) -> Path:
    """<root>/{train,val}/<wnid>/*.JPEG: 3 classes, 8 training and 4 validation JPEGs each."""
    root = tmp_path_factory.mktemp("imagenet")
    for split, count in (("train", 8), ("val", 4)):
        for label, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for n in range(count):
                texture(SIZES[n % len(SIZES)], 100 * label + n).save(folder / f"{wnid}_{n}.JPEG")
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """Tiny-ImageNet's layout: wnids.txt, train/<wnid>/images/, val/images/ + val_annotations.txt."""
    root = tmp_path_factory.mktemp("tiny-imagenet-200")
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for label, wnid in enumerate(WNIDS):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        for n in range(6):
            texture((64, 64), 100 * label + n).save(images / f"{wnid}_{n}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for n in range(9):  # labels in an order of their own: they come from the annotations, not the names
        wnid = WNIDS[(2 * n) % 3]
        texture((64, 64), 1000 + n).save(root / "val" / "images" / f"val_{n}.JPEG")
        lines.append(f"val_{n}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_imagenet_layout_reports_val_as_test_and_transforms_per_split(imagenet_folder, tmp_path):
    data = load_imagenet(str(imagenet_folder), num_classes=3, num_workers=0, image_size=32, resize_size=36)
    assert data.classes == WNIDS and data.split_sizes() == {"train": 24, "test": 12}
    assert all(path.parent.parent.name == "val" for path in data.test_files)
    test_images = torch.cat([images for images, _, _ in data.batches("test", 5, CPU)])
    train_views = torch.cat([images for images, _, _ in data.batches("train", 5, CPU, augment=True)])
    assert test_images.shape == (12, 3, 32, 32) and train_views.shape == (24, 3, 32, 32)
    with pytest.raises(KDResearchError, match=r"^data.resize_size must be an integer >= 224"):
        load_imagenet(str(imagenet_folder), num_classes=3, resize_size=200)
    with pytest.raises(KDResearchError, match=r"val is missing; the layout is <root>/train/<class>/<image> and "
                                              r"<root>/val/<class>/<image>$"):
        (tmp_path / "train" / WNIDS[0]).mkdir(parents=True)
        load_imagenet(str(tmp_path), num_classes=3)


def test_training_views_follow_seed_epoch_and_sample_not_the_workers(imagenet_folder):
    """The crops are drawn in the workers from (augmentation seed, epoch, sample): the same with 0
    or 2 workers and in every pass of an epoch, new in the next epoch."""
    def views(num_workers: int, epoch: int) -> torch.Tensor:
        data = load_imagenet(str(imagenet_folder), num_classes=3, num_workers=num_workers, image_size=32,
                             resize_size=36)
        batches = data.batches("train", 8, CPU, augment=True, augment_seed=7)
        batches.set_epoch(epoch)
        return torch.cat([images for images, _, _ in batches])

    first = views(0, 1)
    assert torch.equal(first, views(2, 1)) and torch.equal(first, views(0, 1))
    assert not torch.equal(first, views(0, 2))
    # The teacher's per-view outputs (batches of 256 in stored order) see the crops the student's
    # shuffled batches of 8 see, sample by sample.
    data = load_imagenet(str(imagenet_folder), num_classes=3, num_workers=0, image_size=32, resize_size=36)
    shuffled = data.batches("train", 8, CPU, generator=torch.Generator().manual_seed(1), augment=True,
                            augment_seed=7)
    by_sample = {int(i): image for images, _, index in shuffled for i, image in zip(index, images)}
    assert all(torch.equal(by_sample[i], first[i]) for i in range(len(first)))


def test_transforms_match_torchvision_geometry():
    image = texture((80, 50), 3)
    evaluated = ResizeCenterCrop(64, 56)(image, 0, 1, 0)
    assert evaluated.shape == (56, 56, 3)
    crop = RandomResizedCropFlip(32)
    boxes = {crop.box(500, 375, torch.Generator().manual_seed(seed)) for seed in range(50)}
    assert len(boxes) == 50
    for left, top, width, height in boxes:
        assert 0 <= left <= 500 - width and 0 <= top <= 375 - height
        assert 0.08 * 500 * 375 * 0.9 <= width * height <= 500 * 375
        assert 3 / 4 * 0.9 <= width / height <= 4 / 3 * 1.1


def test_fingerprint_reads_a_sample_and_changes_when_a_file_is_replaced(imagenet_folder, tmp_path):
    root = tmp_path / "copy"
    os.system(f"cp -r {imagenet_folder} {root}")
    first = load_imagenet(str(root), num_classes=3, num_workers=0).fingerprint()
    assert load_imagenet(str(root), num_classes=3, num_workers=0).fingerprint() == first
    replaced = root / "val" / WNIDS[1] / f"{WNIDS[1]}_2.JPEG"
    texture((80, 80), 999).save(replaced)
    assert load_imagenet(str(root), num_classes=3, num_workers=0).fingerprint() != first
    # The crop size is part of what the data is; augmentation is how a job trains (its identity).
    assert (load_imagenet(str(root), num_classes=3, num_workers=0, augment=False).fingerprint()
            == load_imagenet(str(root), num_classes=3, num_workers=0).fingerprint()
            != load_imagenet(str(root), num_classes=3, num_workers=0, image_size=192).fingerprint())


def test_limits_are_drawn_across_the_classes(imagenet_folder, tiny_folder):
    data = load_imagenet(str(imagenet_folder), num_classes=3, num_workers=0, limit_train=6, limit_test=3)
    tiny = load_tiny_imagenet(str(tiny_folder), num_classes=3, num_workers=0, limit_train=6, limit_test=3)
    for labels in (data.train_labels, data.test_labels, tiny.train_labels, tiny.test_labels):
        assert sorted(labels.tolist()) == sorted([0, 1, 2] * (len(labels) // 3))


def test_tiny_imagenet_labels_val_from_its_annotations_in_memory_at_64_px(tiny_folder):
    data = load_tiny_imagenet(str(tiny_folder), num_classes=3, num_workers=0, augment=True)
    assert data.classes == WNIDS and data.split_sizes() == {"train": 18, "test": 9}
    assert data.test_labels.tolist() == [(2 * n) % 3 for n in range(9)]
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (18, 3, 64, 64)
    views = torch.cat([images for images, _, _ in data.batches("train", 8, CPU, augment=True)])
    assert views.shape == (18, 3, 64, 64)  # the batch-level crop (padding 4) + flip keeps 64 px
    (tiny_folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    try:
        with pytest.raises(KDResearchError, match=r"val_annotations.txt line 1: expected 'file<TAB>wnid<TAB>"):
            load_tiny_imagenet(str(tiny_folder), num_classes=3, num_workers=0)
    finally:
        (tiny_folder / "val" / "val_annotations.txt").write_text(
            "".join(f"val_{n}.JPEG\t{WNIDS[(2 * n) % 3]}\t0\t0\t63\t63\n" for n in range(9)))
    with pytest.raises(KDResearchError, match=r"wnids.txt names 3 classes but data.num_classes=200"):
        load_tiny_imagenet(str(tiny_folder))


def record_evaluation_batches(monkeypatch) -> list[int]:
    """The batch sizes that ImageFolderData.batches is asked for on the test split, from now on."""
    sizes, batches = [], ImageFolderData.batches

    def recording(self, split, batch_size, *args, **kwargs):
        if split == "test":
            sizes.append(batch_size)
        return batches(self, split, batch_size, *args, **kwargs)

    monkeypatch.setattr(ImageFolderData, "batches", recording)
    return sizes


IMAGENET_AT_32_PX = ("data=imagenet", "data.num_classes=3", "data.image_size=32", "data.resize_size=36",
                     "data.num_workers=0", "batch_size=8")


@pytest.mark.slow  # about 30 s: building torchvision's resnet34 and resnet18 dominates
def test_imagenet_preset_distils_from_a_torchvision_teacher_file(imagenet_folder, store, tmp_path):
    """experiment=imagenet_res34_res18 end to end at 32 px: torchvision's resnet34 state_dict saved
    as torchvision saves it loads unchanged as the teacher."""
    import torchvision

    teacher_file = tmp_path / "resnet34-test.pth"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), teacher_file)
    done = check_ok(train_in_process(store, *FAST, "experiment=imagenet_res34_res18", *IMAGENET_AT_32_PX,
                                     f"data.root={imagenet_folder}", "loss=kd", f"teacher.checkpoint={teacher_file}"))
    assert f"teacher: loaded from teacher checkpoint {teacher_file}" in done.output
    run = experiment_runs(mlflow_client(store))[-1]
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "resnet18"
    assert run.data.params["loss.name"] == "kd" and done.result.test_acc >= 0


def test_res50_mv1_preset_trains_on_imagenet_with_lr_scaled_by_the_batch(imagenet_folder, store, monkeypatch):
    """experiment=imagenet_res50_mv1 end to end at 32 px on the ImageNet layout: lr 0.1 x 8 / 256, and
    data.eval_batch_size sets the evaluation batch."""
    evaluation_batches = record_evaluation_batches(monkeypatch)
    done = check_ok(train_in_process(store, *FAST, "experiment=imagenet_res50_mv1", *IMAGENET_AT_32_PX,
                                     f"data.root={imagenet_folder}", "data.eval_batch_size=5"))
    assert evaluation_batches == [5]
    run = experiment_runs(mlflow_client(store))[-1]
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "mobilenet_v1"
    assert float(run.data.params["optimizer.lr"]) == pytest.approx(0.1 * 8 / 256)
    assert run.data.params["device.precision"] == "fp32" and done.result.test_acc >= 0


def test_res50_mv1_preset_trains_on_tiny_imagenet_at_64_px(tiny_folder, store):
    done = check_ok(train_in_process(
        store, *FAST, "experiment=imagenet_res50_mv1", "data=tiny_imagenet", f"data.root={tiny_folder}",
        "data.num_classes=3", "data.num_workers=0", "batch_size=8"))
    run = experiment_runs(mlflow_client(store))[-1]
    assert run.info.status == "FINISHED" and run.data.params["model.image_size"] == "64"
    assert run.data.params["data.augment"] == "True" and done.result.test_acc >= 0
