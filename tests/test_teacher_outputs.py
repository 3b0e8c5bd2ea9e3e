"""The teacher-output cache: same results as running the teacher online, reused across runs,
rebuilt when the teacher or the data change, and with augmentation kept per epoch of views."""

import logging

import pytest
import torch
from conftest import FAST, compose_job, mlflow_client
from omegaconf import OmegaConf

from kdresearch.data.synthetic import make_synthetic
from kdresearch.models import DeepNN
from kdresearch.data.views import VIEWS
from kdresearch.teacher.outputs import CachedTeacher, cache_entry_bytes, cache_key, teacher_outputs
from kdresearch.tracking.store import metric_history
from kdresearch.training.job import run_job

SMALL = [*FAST, "data.limit_train=384", "epochs=2"]


def small_job(store, *overrides):
    return compose_job(store, *SMALL, *overrides)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return run_job(small_job(tmp, "model=deep", "epochs=1"), tmp / "job").checkpoint


@pytest.mark.parametrize("loss", ["kd", "cosine", "regressor"])
def test_cached_run_equals_online_run(tmp_path, teacher_checkpoint, loss):
    client = mlflow_client(tmp_path)
    histories = {}
    for cache in ("true", "false"):
        cfg = small_job(tmp_path, f"loss={loss}", f"teacher.checkpoint={teacher_checkpoint}",
                        f"cache.enabled={cache}")
        result = run_job(cfg, tmp_path / f"job-{cache}")
        run = client.get_run(result.run_id)
        assert run.data.tags["teacher_cache"] == ("used" if cache == "true" else "online")
        keys = [key for key in run.data.metrics if key != "epoch_seconds" and not key.startswith("budget/")]  # times, teacher counts differ
        histories[cache] = metric_history(client, result.run_id, keys)
    assert histories["true"].keys() == histories["false"].keys()
    for key, cached in histories["true"].items():
        online = histories["false"][key]
        assert [step for step, _ in cached] == [step for step, _ in online]
        # Batched at 256 for the cache vs 128 online: same math, float rounding may differ.
        assert [v for _, v in cached] == pytest.approx([v for _, v in online], rel=1e-4, abs=1e-4), key
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_cache_is_reused_and_keyed_by_teacher_and_data(tmp_path):
    data = make_synthetic(num_train=64, num_test=16)
    torch.manual_seed(0)
    teacher = DeepNN().eval()
    cfg = OmegaConf.create({"enabled": True, "dir": str(tmp_path), "max_gb": 1.0})
    device = torch.device("cpu")

    first = teacher_outputs(teacher, ("logits",), data, device, "fp32", True, False, cfg)
    assert isinstance(first, CachedTeacher)
    (path,) = tmp_path.glob("*.pt")
    stamp = path.stat().st_mtime_ns
    second = teacher_outputs(teacher, ("logits",), data, device, "fp32", True, False, cfg)
    assert torch.equal(first.outputs["logits"], second.outputs["logits"])
    assert path.stat().st_mtime_ns >= stamp and len(list(tmp_path.glob("*.pt"))) == 1

    key = cache_key(teacher, data, "fp32", True)
    assert cache_key(teacher, make_synthetic(num_train=64, num_test=16, seed=1), "fp32", True) != key
    assert cache_key(teacher, data, "bf16", True) != key
    with torch.no_grad():
        teacher.classifier[-1].bias.add_(1.0)
    assert cache_key(teacher, data, "fp32", True) != key


def test_views_over_the_cache_bound_are_noted_once_for_all_views(tmp_path, caplog):
    data = make_synthetic(num_train=64, num_test=16)
    teacher = DeepNN().eval()
    epoch_gb = cache_entry_bytes(teacher, ("logits",), data.train_size, "fp32") / 1e9
    # Room for 10 epochs of one view: 6 epochs of one view fit, 6 of two views do not.
    cfg = OmegaConf.create({"enabled": True, "dir": str(tmp_path), "max_gb": 10 * epoch_gb})
    caplog.set_level(logging.INFO, logger="kdresearch.teacher.outputs")
    teacher_outputs(teacher, ("logits",), data, torch.device("cpu"), "fp32", True, True, cfg, epochs=6)
    assert "epochs evicted" not in caplog.text
    teacher_outputs(teacher, ("logits",), data, torch.device("cpu"), "fp32", True, True, cfg, epochs=6, views=VIEWS)
    (line,) = [record.getMessage() for record in caplog.records if "epochs evicted" in record.getMessage()]
    assert f"the 2 views of all 6 epochs take {12 * epoch_gb:.1f} GB" in line


def test_augmented_views_depend_on_seed_epoch_and_sample_only():
    """A sample's view is the same whatever the batch size, data order or shard; it changes with
    the epoch and the augmentation seed."""
    data = make_synthetic(num_train=64, num_test=16, augment=True)
    device = torch.device("cpu")

    def views(batch_size, order_seed, epoch, augment_seed=7, shard=(0, 1)):
        batches = data.batches("train", batch_size, device, generator=torch.Generator().manual_seed(order_seed),
                               augment=True, augment_seed=augment_seed, shard=shard)
        batches.set_epoch(epoch)
        seen = {}
        for images, _, index in batches:
            seen.update({int(i): image for i, image in zip(index, images)})
        return seen

    reference = views(16, 0, epoch=1)
    assert len(reference) == 64
    for other in (views(64, 1, epoch=1), {**views(8, 2, 1, shard=(0, 2)), **views(8, 2, 1, shard=(1, 2))}):
        assert all(torch.equal(other[i], reference[i]) for i in range(64))
    assert not all(torch.equal(views(16, 0, epoch=2)[i], reference[i]) for i in range(64))
    assert not all(torch.equal(views(16, 0, 1, augment_seed=8)[i], reference[i]) for i in range(64))


def test_augmented_views_teacher_equals_online_and_is_shared(tmp_path, teacher_checkpoint):
    """With data.augment, the teacher's outputs for each epoch's views are computed once and read by
    every job with the same augmentation seed; the metrics equal the online computation's."""
    client = mlflow_client(tmp_path)
    common = ("loss=kd", f"teacher.checkpoint={teacher_checkpoint}", "data.augment=true", "augment_seed=5")

    def run(*overrides):
        result = run_job(small_job(tmp_path, *common, *overrides), tmp_path / f"job-{len(overrides)}-{overrides}")
        run = client.get_run(result.run_id)
        keys = [key for key in run.data.metrics if key != "epoch_seconds" and not key.startswith("budget/")]  # times, teacher counts differ
        return run, metric_history(client, result.run_id, keys)

    shared_run, shared = run()
    online_run, online = run("cache.enabled=false")
    assert (shared_run.data.tags["teacher_cache"], online_run.data.tags["teacher_cache"]) == ("used", "online")
    for key, values in shared.items():
        assert [v for _, v in values] == pytest.approx([v for _, v in online[key]], rel=1e-4, abs=1e-4), key
    entries = sorted(path.name for path in (tmp_path / "cache").glob("*.pt"))
    assert len(entries) == 2 and all("-views5-epoch" in name for name in entries)  # one per epoch

    files = {path: path.stat().st_ino for path in (tmp_path / "cache").glob("*.pt")}  # a rebuild renames a new file in
    run("seed=3", "T=4")  # another student seed and temperature, the same views: read, not rebuilt
    assert {path: path.stat().st_ino for path in files} == files
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    run("augment_seed=6")  # other views: other entries
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4
