"""The teacher-output cache: same results as running the teacher online, reused across runs,
rebuilt when the teacher or the data change, and bypassed under random augmentation."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from kdresearch.data import make_synthetic
from kdresearch.models import DeepNN
from kdresearch.teacher_outputs import CachedTeacher, OnlineTeacher, cache_key, teacher_outputs
from kdresearch.tracking import metric_history
from kdresearch.trainer import run_job
from conftest import FAST

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = ["data=synthetic", *FAST, "data.limit_train=384", "epochs=2"]


def compose_job(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=SMALL + [
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"cache.dir={tmp_path / 'cache'}", *overrides,
        ])


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return run_job(compose_job(tmp, "model=deep", "epochs=1"), tmp / "job").checkpoint


@pytest.mark.parametrize("loss", ["kd", "cosine", "regressor"])
def test_cached_run_equals_online_run(tmp_path, teacher_checkpoint, loss):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    histories = {}
    for cache in ("true", "false"):
        cfg = compose_job(tmp_path, f"loss={loss}", f"teacher.checkpoint={teacher_checkpoint}",
                          f"cache.enabled={cache}")
        result = run_job(cfg, tmp_path / f"job-{cache}")
        run = client.get_run(result.run_id)
        assert run.data.tags["teacher_cache"] == ("used" if cache == "true" else "online")
        keys = [key for key in run.data.metrics if key != "epoch_seconds"]
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


def test_augmentation_runs_the_teacher_online(tmp_path):
    data = make_synthetic(num_train=64, num_test=16, augment=True)
    cfg = OmegaConf.create({"enabled": True, "dir": str(tmp_path), "max_gb": 1.0})
    provider = teacher_outputs(DeepNN().eval(), ("logits",), data, torch.device("cpu"), "fp32", True, True, cfg)
    assert isinstance(provider, OnlineTeacher)
    assert not list(tmp_path.glob("*.pt"))
