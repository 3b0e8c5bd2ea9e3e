"""The ImageNet networks (kdresearch.architectures.imagenet): torchvision's parameter names and
outputs, mdistiller's MobileNetV1 layout, every output's shape against the declared shape facts at
224 and 64 px, the model configs' `image_size`, torchvision's weight files as teachers (by file and
by name from torch's hub cache, never downloaded), and a ResNet-34 -> ResNet-18 KD job."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import FAST, check_ok, compose_config, mlflow_client, train_in_process
from loss_checks import one_line
from torch.nn import functional as F

from kdresearch.architectures import imagenet
from kdresearch.config.groups import build
from kdresearch.errors import KDResearchError
from kdresearch.models import parameter_count
from kdresearch.teacher.sources import named_file, obtain_teacher

TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")
ALL = (*TORCHVISION, "mobilenet_v1")
RESNET34_FILE = "resnet34-b627a593.pth"  # the file name of torchvision's ResNet34_Weights.IMAGENET1K_V1

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """torch's hub cache in a temporary folder (torch.hub.get_dir() follows TORCH_HOME); the
    checkpoints folder where torchvision's weight files go. Any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints"


# --- architecture -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_names_and_outputs_are_torchvisions(arch):
    ours = getattr(imagenet, arch)(num_classes=10, image_size=64).eval()
    reference = getattr(torchvision.models, arch)(num_classes=10).eval()
    theirs = reference.state_dict()
    assert list(ours.state_dict()) == list(theirs)  # the same keys, in the same order, no prefix
    assert {key: value.shape for key, value in ours.state_dict().items()} == {
        key: value.shape for key, value in theirs.items()}
    ours.load_state_dict(theirs)  # strict
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images))


def test_mobilenet_v1_has_mdistillers_layout():
    """mdistiller's MobileNetV1: `model` = a conv-BN-ReLU stem (0) and 13 depthwise-separable blocks
    (conv 0, BN 1, ReLU 2, conv 3, BN 4, ReLU 5), then `fc`; 4,231,976 parameters for 1000 classes."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = ["model.0.0.weight", *(f"model.0.1.{name}" for name in bn)]
    for block in range(1, 14):
        for conv, norm in ((0, 1), (3, 4)):
            expected += [f"model.{block}.{conv}.weight", *(f"model.{block}.{norm}.{name}" for name in bn)]
    expected += ["fc.weight", "fc.bias"]
    model = imagenet.mobilenet_v1()
    assert list(model.state_dict()) == expected
    assert parameter_count(model) == 4_231_976
    assert [model.model[i][3].out_channels for i in (3, 5, 11, 13)] == [128, 256, 512, 1024]
    assert [model.model[i][0].stride[0] for i in range(1, 14)] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]


@pytest.mark.parametrize("size", [224, 64])
@pytest.mark.parametrize("arch", ALL)
def test_outputs_match_the_shape_facts(arch, size):
    model = getattr(imagenet, arch)(num_classes=7, image_size=size).eval()
    assert model.image_size == size
    assert model.stage_sizes == tuple(-(-size // factor) for factor in (4, 8, 16, 32))  # 56..7 at 224
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size))
        out = model(torch.randn(1, 3, size, size), with_features=True)
    assert logits.shape == out.logits.shape == (1, 7)
    assert out.embedding.shape == (1, model.embedding_dim)
    declared = [(1, channels, side, side) for channels, side in zip(model.stage_channels, model.stage_sizes)]
    assert [tuple(stage.shape) for stage in out.stages] == declared
    assert [tuple(stage.shape) for stage in out.preact_stages] == declared
    assert out.hidden.shape == (1, model.hidden_dim)
    if arch == "mobilenet_v2":  # its stages end linearly; a 1x1 conv to 1280 channels follows the last
        assert all(pre is stage for pre, stage in zip(out.preact_stages, out.stages))
    else:  # the stage is its pre-activation after the final ReLU, which did not overwrite it
        torch.testing.assert_close(out.embedding, out.stages[-1].mean((2, 3)))
        assert all(torch.equal(F.relu(pre), stage) for pre, stage in zip(out.preact_stages, out.stages))
        assert any(bool((pre < 0).any()) for pre in out.preact_stages)


def test_stage_channels_and_embedding_at_224():
    facts = {arch: (getattr(imagenet, arch)().stage_channels, getattr(imagenet, arch)().embedding_dim)
             for arch in ALL}
    assert facts == {
        "resnet18": ((64, 128, 256, 512), 512), "resnet34": ((64, 128, 256, 512), 512),
        "resnet50": ((256, 512, 1024, 2048), 2048), "mobilenet_v2": ((24, 32, 96, 320), 1280),
        "mobilenet_v1": ((128, 256, 512, 1024), 1024)}


def test_model_config_takes_the_datas_image_size():
    """`model.image_size` follows `data.image_size` and is 32 (today's images) where the data has none."""
    assert compose_config("model=resnet18").model.image_size == 32
    assert compose_config("teacher=resnet50").teacher.model.image_size == 32
    cfg = compose_config("model=mobilenet_v1", "+data.image_size=64")
    model = build(cfg.model, "model")
    assert (model.image_size, model.stage_sizes, model.num_classes) == (64, (16, 8, 4, 2), 10)
    with pytest.raises(KDResearchError) as raised:
        build(compose_config("model=resnet18", "model.image_size=0").model, "model")
    assert one_line(raised) == "model: image_size must be a whole number of pixels >= 1, got 0"


# --- torchvision weight files as teachers ------------------------------------------------------

def test_torchvision_state_dict_loads_as_a_teacher_checkpoint(tmp_path):
    file = tmp_path / RESNET34_FILE
    torch.save(torchvision.models.resnet34().state_dict(), file)
    cfg = compose_config("teacher=resnet34", f"teacher.checkpoint={file}", "data.num_classes=1000")
    teacher = build(cfg.teacher.model, "teacher.model")
    assert obtain_teacher(cfg, teacher, "unused", tracker=None, train=None).run_id is None  # no MLflow run
    saved = torch.load(file, weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in teacher.state_dict().items())


def test_teacher_weights_name_a_file_in_the_hub_cache(hub):
    cfg = compose_config("teacher=resnet34", "teacher.weights=IMAGENET1K_V1", "data.num_classes=1000")
    teacher = build(cfg.teacher.model, "teacher.model")
    with pytest.raises(KDResearchError) as raised:
        obtain_teacher(cfg, teacher, "unused", tracker=None, train=None)
    assert one_line(raised) == (
        f"teacher.weights=IMAGENET1K_V1: torchvision's resnet34 weights file {RESNET34_FILE} is not in "
        f"torch's hub cache; download https://download.pytorch.org/models/{RESNET34_FILE} and put it at "
        f"{hub / RESNET34_FILE} (nothing is downloaded here), or name a file with teacher.checkpoint=FILE")

    hub.mkdir(parents=True)
    weights = torchvision.models.resnet34().state_dict()
    torch.save(weights, hub / RESNET34_FILE)
    assert named_file(cfg, teacher) == hub / RESNET34_FILE
    source = obtain_teacher(cfg, teacher, "unused", tracker=None, train=None)
    assert all(torch.equal(value, weights[key]) for key, value in teacher.state_dict().items())
    # provenance: torchvision's name, the file and its sha256
    assert (source.weights, source.file) == ("IMAGENET1K_V1", str((hub / RESNET34_FILE).resolve()))
    assert source.file_sha256 == hashlib.sha256((hub / RESNET34_FILE).read_bytes()).hexdigest()
    default = compose_config("teacher=resnet34", "teacher.weights=DEFAULT")  # torchvision's alias of V1
    assert named_file(default, teacher) == hub / RESNET34_FILE


@pytest.mark.parametrize("overrides, message", [
    (["teacher=resnet50", "teacher.weights=IMAGENET1K_V9"],
     ("teacher.weights=IMAGENET1K_V9: torchvision's resnet50 has no such weights (it has IMAGENET1K_V1, "
      "IMAGENET1K_V2, DEFAULT)")),
    (["teacher=mobilenet_v1", "+teacher.weights=IMAGENET1K_V1"],
     ("teacher.weights=IMAGENET1K_V1: torchvision has no weights for mobilenet_v1 (it has them for resnet18, "
      "resnet34, resnet50, mobilenet_v2); name a file with teacher.checkpoint=FILE")),
    (["teacher=resnet18", "teacher.weights=IMAGENET1K_V1", "teacher.checkpoint=elsewhere.pth"],
     "teacher.checkpoint and teacher.weights both name the teacher's weights: set one"),
])
def test_teacher_weights_refusals(hub, overrides, message):
    cfg = compose_config(*overrides)
    with pytest.raises(KDResearchError) as raised:
        named_file(cfg, build(cfg.teacher.model, "teacher.model"))
    assert one_line(raised) == message


def test_kd_job_resnet34_to_resnet18_with_torchvision_weights(store, hub):
    """One tiny KD job whose teacher is a torchvision-format file found by its weights name."""
    hub.mkdir(parents=True)
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), hub / RESNET34_FILE)
    done = check_ok(train_in_process(
        store, *FAST, "model=resnet18", "teacher=resnet34", "teacher.weights=IMAGENET1K_V1", "loss=kd",
        "data.limit_train=32", "data.limit_test=16", "batch_size=16", "device=cpu"))
    assert f"teacher: loaded from teacher checkpoint {hub / RESNET34_FILE}" in done.output
    run = mlflow_client(store).get_run(done.run_id)
    assert run.info.status == "FINISHED"
    assert {"train/kd", "test/acc"} <= set(run.data.metrics)
    assert run.data.params["model.image_size"] == "32" and run.data.params["teacher.weights"] == "IMAGENET1K_V1"
