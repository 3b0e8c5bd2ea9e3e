"""loss=mlkd and the views it reads: the loss against a plain implementation of the authors' formula,
the strong view (PIL's pixels, a pure function of seed, epoch and sample), and MLKD as a job."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_resumed_exactly,
    check_ok,
    compose_config,
    compose_job,
    experiment_runs,
    interrupted_after_epoch_1,
    mlflow_client,
    train_in_process,
)
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch.nn import functional as F

from kdresearch.data import randaugment
from kdresearch.data.synthetic import make_synthetic
from kdresearch.data.views import STRONG, WEAK, ViewsForward
from kdresearch.errors import KDResearchError
from kdresearch.losses.mlkd import MLKD
from kdresearch.models import ModelOutputs

pytestmark = pytest.mark.usefixtures("one_compute_thread")


# --- the loss against the authors' arithmetic ---------------------------------------------------------
# Written here from KD_ours.py / MLKD.py's arithmetic: each term a batch scalar, times the boolean
# mask from np.percentile(.., 50), then .mean(); temperatures (T, 3, 5, 2, 6); the strong kd sum's
# last two terms on the weak view; cc and bc on the weak view only.

def _kd(s, t, T, stand):
    if stand:
        s, t = [(z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True)) for z in (s, t)]
    return F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="none").sum(1).mean() * T**2


def _cc(s, t, T):
    ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    return ((torch.mm(pt.transpose(1, 0), pt) - torch.mm(ps.transpose(1, 0), ps)) ** 2).sum() / s.shape[1]


def _bc(s, t, T):
    ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    return ((torch.mm(pt, pt.transpose(1, 0)) - torch.mm(ps, ps.transpose(1, 0))) ** 2).sum() / s.shape[0]


def authors_mlkd(sw, ss, tw, ts, y, T, ce_w, kd_w, stand=False):
    pred = F.softmax(tw.detach(), dim=1)
    conf = pred.max(dim=1)[0]
    mask = conf.le(np.percentile(conf.numpy().flatten(), 50)).bool()
    class_conf = pred.sum(dim=0)
    class_mask = class_conf.le(np.percentile(class_conf.numpy().flatten(), 50)).bool()
    temps = [T, 3.0, 5.0, 2.0, 6.0]
    ce = ce_w * (F.cross_entropy(sw, y) + F.cross_entropy(ss, y))
    kd = sum(kd_w * (_kd(sw, tw, u, stand) * mask).mean() for u in temps)
    kd = kd + sum(kd_w * _kd(ss, ts, u, stand) for u in temps[:3])  # strong view at T, 3, 5
    kd = kd + sum(kd_w * _kd(sw, tw, u, stand) for u in temps[3:])  # ... and the weak one at 2, 6
    cc = sum(kd_w * (_cc(sw, tw, u) * class_mask).mean() for u in temps)
    bc = sum(kd_w * (_bc(sw, tw, u) * mask).mean() for u in temps)
    return ce + kd + cc + bc, {"ce": ce, "kd": kd, "cc": cc, "bc": bc}


@pytest.mark.parametrize("batch, T, standardize", [(8, 4.0, False), (7, 2.0, True), (6, 3.0, False)])
def test_loss_and_gradients_match_the_authors_formula(batch, T, standardize):
    generator = torch.Generator().manual_seed(batch)
    logits = [3 * torch.randn(batch, 10, generator=generator) for _ in range(4)]
    labels = torch.randint(0, 10, (batch,), generator=generator)
    ce_w, kd_w = 0.1, 0.9
    ours_in = [z.clone().requires_grad_(i < 2) for i, z in enumerate(logits)]
    ref_in = [z.clone().requires_grad_(i < 2) for i, z in enumerate(logits)]

    loss = MLKD(T=T, ce_weight=ce_w, distill_weight=kd_w, standardize=standardize)
    total, parts = loss({WEAK: ModelOutputs(ours_in[0]), STRONG: ModelOutputs(ours_in[1])},
                        {WEAK: ModelOutputs(ours_in[2]), STRONG: ModelOutputs(ours_in[3])}, labels)
    expected, expected_parts = authors_mlkd(*ref_in, labels, T, ce_w, kd_w, standardize)

    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts["ce"] * ce_w, expected_parts["ce"], rtol=1e-6, atol=1e-7)
    for name in ("kd", "cc", "bc"):  # logged without the distill weight
        torch.testing.assert_close(parts[name] * kd_w, expected_parts[name], rtol=1e-6, atol=1e-7)
        assert parts[name] > 0
    total.backward()
    expected.backward()
    for ours, ref in zip(ours_in[:2], ref_in[:2]):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_the_masks_enter_as_the_share_they_keep():
    """An odd batch keeps (B + 1) / 2 samples: the kd term's weak part scales by 4/7, not 1/2."""
    from kdresearch.losses.mlkd import confidence_shares

    teacher = torch.tensor([[5.0, 0, 0], [4, 0, 0], [3, 0, 0], [2, 0, 0], [1, 0, 0], [0.5, 0, 0], [0, 0, 0]])
    sample_share, class_share = confidence_shares(teacher)
    assert sample_share.item() == pytest.approx(4 / 7) and class_share.item() == pytest.approx(2 / 3)


def test_mlkd_asks_for_both_views_and_checks_its_options():
    assert MLKD.views == (WEAK, STRONG) and MLKD.teacher_fields == ("logits",)
    with pytest.raises(KDResearchError, match="loss.T"):
        MLKD(T=0)
    with pytest.raises(KDResearchError, match="loss.standardize"):
        MLKD(standardize="maybe")


def test_a_combined_loss_gives_single_view_terms_the_weak_view():
    from kdresearch.losses.combine import CombinedLoss
    from kdresearch.losses.kd import SoftTargetKD, soft_target_kd

    generator = torch.Generator().manual_seed(0)
    student, teacher = ({view: ModelOutputs(torch.randn(6, 10, generator=generator)) for view in (WEAK, STRONG)}
                        for _ in range(2))
    labels = torch.randint(0, 10, (6,), generator=generator)
    combined = CombinedLoss({"mlkd": MLKD(), "kd": SoftTargetKD(T=4)}, {"kd": 0.5})
    assert combined.views == (WEAK, STRONG)
    total, parts = combined(student, teacher, labels)
    mlkd_total, _ = MLKD()(student, teacher, labels)
    kd_weak = soft_target_kd(student[WEAK].logits, teacher[WEAK].logits, 4)
    torch.testing.assert_close(total, mlkd_total + 0.5 * 0.25 * kd_weak)
    assert {"ce", "kd", "cc", "bc", "kd_kd"} == set(parts)


# --- the strong view ------------------------------------------------------------------------------------

def _smooth_image(seed: int) -> torch.Tensor:
    coarse = torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(seed)).float()
    return F.interpolate(coarse, size=32, mode="bilinear").round().clamp(0, 255).to(torch.uint8)


PILLOW = {  # the authors' RandAugment operations, as Pillow computes them
    "AutoContrast": lambda im, v: ImageOps.autocontrast(im),
    "Brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "Color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "Contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "Equalize": lambda im, v: ImageOps.equalize(im),
    "Posterize": lambda im, v: ImageOps.posterize(im, max(1, int(v))),
    "Rotate": lambda im, v: im.rotate(v),
    "Sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "ShearX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda im, v: ImageOps.solarize(im, v),
    "TranslateX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image[0].permute(1, 2, 0).numpy())


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize("name", list(PILLOW))
def test_each_operation_gives_pillows_pixels(name):
    low, high = randaugment.RANGES.get(name, (0, 1))
    for seed, position in enumerate((0.03, 0.37, 0.5, 0.81, 0.98)):
        image, value = _smooth_image(seed), low + (high - low) * position
        ours = randaugment.OPERATION_FUNCTIONS[name](image.float(), torch.tensor([value]))
        assert torch.equal(ours, _tensor(PILLOW[name](_pil(image), value))), (name, value)


def test_cutout_is_the_authors_grey_square():
    image = _smooth_image(0)
    for size, cx, cy in ((0.9, 0.1, 0.7), (0.3, 0.95, 0.02), (0.5, 0.5, 0.5)):
        ours = randaugment.cutout(image.float(), torch.tensor([size]), torch.tensor([[cx, cy]]))
        # the authors': side v * W with v = 0.5 u; centre np.random.uniform(W) = W + (1 - W) * u
        side = 0.5 * size * 32
        x0, y0 = int(max(0, 32 + (1 - 32) * cx - side / 2)), int(max(0, 32 + (1 - 32) * cy - side / 2))
        pil = _pil(image)
        ImageDraw.Draw(pil).rectangle((x0, y0, min(32, x0 + side), min(32, y0 + side)), (125, 123, 114))
        assert torch.equal(ours, _tensor(pil)), (size, cx, cy)


def test_strong_view_is_a_pure_function_of_seed_epoch_and_sample():
    data = make_synthetic(num_train=96, num_test=16, augment=True)

    def strong_and_weak(batch_size: int, order_seed: int, epoch: int = 2):
        batches = data.batches("train", batch_size, torch.device("cpu"),
                               generator=torch.Generator().manual_seed(order_seed), augment=True, augment_seed=5)
        batches.request_views((WEAK, STRONG))
        batches.set_epoch(epoch)
        strong, weak = torch.zeros(96, 3, 32, 32), torch.zeros(96, 3, 32, 32)
        for images, _, index in batches:
            strong[index], weak[index] = images[STRONG], images[WEAK]
        return strong, weak

    strong, weak = strong_and_weak(32, order_seed=0)
    again, weak_again = strong_and_weak(64, order_seed=1)  # another batch size and order: the same views
    assert torch.equal(strong, again) and torch.equal(weak, weak_again)
    assert not torch.equal(strong_and_weak(32, 0, epoch=3)[0], strong)  # a new view each epoch
    per_sample_differs = (strong != weak).flatten(1).any(dim=1)
    assert per_sample_differs.all()

    plain = data.batches("train", 32, torch.device("cpu"), augment=True, augment_seed=5)
    plain.set_epoch(2)
    for images, _, index in plain:  # the weak view is the ordinary augmented view, bit for bit
        assert torch.equal(images, weak[index])


def test_views_forward_runs_the_model_on_each_view():
    model = torch.nn.Linear(4, 3)
    images = {WEAK: torch.randn(5, 4), STRONG: torch.randn(5, 4)}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = model

        def forward(self, x, with_features=False):
            return self.linear(x)

    out = ViewsForward(Net())(images)
    assert set(out) == {WEAK, STRONG} and torch.equal(out[STRONG], model(images[STRONG]))


# --- as a job --------------------------------------------------------------------------------------

TINY = ("debug=tiny", "data=synthetic", "loss=mlkd", "data.augment=true", "batch_size=64")


def test_mlkd_job_trains_on_two_views_and_logs_its_parts(store):
    done = check_ok(train_in_process(store, *TINY, "epochs=2"))
    runs = experiment_runs(mlflow_client(store))
    student = [run for run in runs if run.data.tags.get("loss") == "mlkd"]
    assert len(student) == 1, done.stdout[-3000:]
    metrics, tags = student[0].data.metrics, student[0].data.tags
    for part in ("ce", "kd", "cc", "bc"):
        assert math.isfinite(metrics[f"train/{part}"]) and metrics[f"train/{part}"] > 0, part
    assert metrics["budget/views_per_image"] == 4  # 2 epochs x (weak + strong)
    assert metrics["budget/teacher_cache_hits"] == 2 * 2 * 256  # both views of 256 images, twice
    assert tags["teacher_cache"] == "used"
    cached = sorted(path.name for path in (store / "cache").glob("*.pt"))
    assert sum("-strong1-epoch" in name for name in cached) == 2  # one strong entry per epoch
    assert sum("-views" in name and "-strong1-" not in name for name in cached) == 2  # and one weak


def test_mlkd_refuses_unaugmented_data_before_training(store):
    done = train_in_process(store, "debug=tiny", "data=synthetic", "loss=mlkd")
    assert done.returncode == 1
    assert "error: loss=mlkd trains on 2 augmented views of each image (weak, strong): set data.augment=true" \
        in done.stdout
    assert experiment_runs(mlflow_client(store)) == []


def test_mlkd_refuses_data_whose_workers_draw_the_views_before_training():
    from kdresearch.config.validation import check_config

    cfg = compose_config("loss=mlkd", "data=imagenet", "data.root=/nowhere", "model=resnet18", "teacher=resnet34")
    with pytest.raises(KDResearchError) as raised:
        check_config(cfg)
    message = str(raised.value)
    assert "loss=mlkd" in message and "DataLoader workers" in message and "in-memory data" in message
    assert "\n" not in message


@pytest.mark.slow
def test_mlkd_resumes_bit_exactly(store):
    from kdresearch.training.job import run_job

    pair = ["model=resnet8", "teacher=resnet14", "data.num_train=256", "data.num_test=64", "device=cpu", "epochs=2",
            "batch_size=64", "teacher.epochs=1", "teacher.batch_size=64", "optimizer=sgd", "optimizer.lr=0.05",
            "scheduler=multistep", "scheduler.milestones=[1]", "tracking.log_model=false", "loss=mlkd",
            "data.augment=true", "loss.standardize=true", "loss.T=2", "loss.distill_weight=9"]
    job = run_job(compose_job(store, *pair), store / "done")
    client = mlflow_client(store)
    interrupted = interrupted_after_epoch_1(client, job, store / "interrupted")
    resumed = run_job(compose_job(store, *pair, f"resume={interrupted}"), store / "unused")
    assert_resumed_exactly(Path(job.checkpoint), Path(resumed.checkpoint))
