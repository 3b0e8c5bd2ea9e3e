"""The teacher-output cache under concurrency and damage: parallel jobs build an entry once and
never read a partial one; truncated, corrupt, wrong-shaped or older-format entries are reported,
deleted and rebuilt; a full disk or an unusable cache folder falls back to the online teacher."""

from __future__ import annotations

import errno
import logging
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from omegaconf import OmegaConf
from processes import Process

from kdresearch.data.synthetic import make_synthetic
from kdresearch.models import DeepNN
from kdresearch.runtime import locks
from kdresearch.teacher import outputs as cache
from kdresearch.teacher.outputs import CachedTeacher, OnlineTeacher, teacher_outputs
from kdresearch.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_compute_thread")

FIELDS = ("logits", "stage1")
DEVICE = torch.device("cpu")
NUM_TRAIN = 64


def tiny_teacher() -> DeepNN:
    torch.manual_seed(0)
    return DeepNN().eval()


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_train=NUM_TRAIN, num_test=16)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.fixture(scope="module")
def online(teacher, data) -> dict[str, torch.Tensor]:
    """The fields as the online teacher gives them, row i for training sample i."""
    provider = OnlineTeacher(teacher, DEVICE, "fp32")
    result = {field: torch.empty(NUM_TRAIN, *shape) for field, shape in cache.sample_shapes(teacher, FIELDS).items()}
    for images, _, index in data.batches("train", 16, DEVICE):
        out = provider(images, index)
        result["logits"][index] = out.logits
        result["stage1"][index] = out.stages[1]
    return result


def cache_cfg(folder: Path):
    return OmegaConf.create({"enabled": True, "dir": str(folder), "max_gb": 1.0})


def build(teacher, data, folder: Path):
    return teacher_outputs(teacher, FIELDS, data, DEVICE, "fp32", False, False, cache_cfg(folder))


def assert_matches_online(outputs: dict[str, torch.Tensor], online: dict[str, torch.Tensor]) -> None:
    assert sorted(outputs) == sorted(online)
    for field, expected in online.items():
        # The cache runs batches of 256, the reference batches of 16: same math, rounding may differ.
        torch.testing.assert_close(outputs[field], expected, rtol=1e-5, atol=1e-5, msg=field)


def assert_valid_entry(path: Path, teacher, online) -> None:
    entry = load_checkpoint(path)
    expected = {field: (NUM_TRAIN, *shape) for field, shape in cache.sample_shapes(teacher, FIELDS).items()}
    assert cache._entry_fault(entry, expected) is None
    assert_matches_online(entry["outputs"], online)


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


# --- parallel jobs -----------------------------------------------------------------------------

JOB = textwrap.dedent("""
    import logging, os, sys, time
    from pathlib import Path
    import torch
    from omegaconf import OmegaConf
    from kdresearch.teacher import outputs as cache
    from kdresearch.data.synthetic import make_synthetic
    from kdresearch.models import DeepNN

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder, counter, out, ready, go = map(Path, sys.argv[1:6])
    compute = cache._compute

    def counted_compute(*args, **kwargs):
        with open(counter, "a") as stream:
            stream.write(f"{os.getpid()}\\n")
        time.sleep(1.5)  # a wide window in which a second builder would start without the lock
        return compute(*args, **kwargs)

    cache._compute = counted_compute
    torch.manual_seed(0)
    teacher = DeepNN().eval()
    data = make_synthetic(num_train=64, num_test=16)
    data.fingerprint()
    ready.touch()
    while not go.exists():  # all four start at once
        time.sleep(0.01)
    provider = cache.teacher_outputs(teacher, ("logits", "stage1"), data, torch.device("cpu"), "fp32",
                                     False, False, OmegaConf.create({"enabled": True, "dir": str(folder),
                                                                     "max_gb": 1.0}))
    torch.save({"used_cache": provider.used_cache, "outputs": provider.outputs}, out)
""")


@pytest.mark.slow  # four processes
def test_parallel_jobs_build_the_entry_once_and_read_it_whole(tmp_path, teacher, online):
    folder, counter, go = tmp_path / "cache", tmp_path / "computed.txt", tmp_path / "go"
    jobs = []
    for number in range(4):
        out, ready = tmp_path / f"out{number}.pt", tmp_path / f"ready{number}"
        command = [sys.executable, "-c", JOB, *map(str, (folder, counter, out, ready, go))]
        jobs.append((Process(command, tmp_path / f"job{number}.log", one_thread=True), out, ready))
    for process, _, ready in jobs:
        process.wait_until(ready.exists, f"{ready.name}", poll=0.05)
    go.touch()
    for process, _, _ in jobs:
        process.check_ok()
    logs = [process.output for process, _, _ in jobs]

    assert len(counter.read_text().split()) == 1, "the entry was computed more than once"
    combined = "\n".join(logs)
    assert combined.count("built and saved") == 1 and combined.count("cached, read from") == 3, combined
    assert "WARNING" not in combined, combined
    results = [torch.load(out, weights_only=True) for _, out, _ in jobs]
    assert all(result["used_cache"] for result in results)
    for result in results:
        assert_matches_online(result["outputs"], online)
        for field in FIELDS:
            assert torch.equal(result["outputs"][field], results[0]["outputs"][field])
    (path,) = folder.glob("*.pt")
    assert_valid_entry(path, teacher, online)
    assert not list(folder.glob(".*.tmp"))


def test_waiting_for_the_lock_is_logged_once_and_interruptible(tmp_path, teacher, data, caplog, monkeypatch):
    folder = tmp_path / "cache"
    path = folder / f"{cache.cache_key(teacher, data, 'fp32', False)}-{'-'.join(FIELDS)}.pt"
    holder = FileLock(folder / ".locks" / f"{path.name}.lock")
    folder.joinpath(".locks").mkdir(parents=True)
    checks = []

    def check():  # a SIGTERM arrives while the job waits
        checks.append(1)
        if len(checks) == 4:
            raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(locks, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(cache.interrupts, "check", check)
    with holder, caplog.at_level(logging.INFO, logger="kdresearch.teacher.outputs"):
        with pytest.raises(KeyboardInterrupt):
            build(teacher, data, folder)
    waits = [r.getMessage() for r in caplog.records if "waiting for another job" in r.getMessage()]
    assert len(waits) == 1 and path.name in waits[0]
    assert not path.exists()


# --- damaged entries ---------------------------------------------------------------------------

def truncate(path: Path, teacher) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path, teacher) -> None:
    path.write_bytes(b"")


def flip_bytes(path: Path, teacher) -> None:
    """Flip bytes inside the stored logits (the zip keeps tensors uncompressed)."""
    raw = path.read_bytes()
    logits = load_checkpoint(path)["outputs"]["logits"]
    offset = raw.find(logits.contiguous().view(torch.uint8).numpy().tobytes())
    assert offset > 0
    damaged = bytearray(raw)
    for position in range(offset + 100, offset + 108):
        damaged[position] ^= 0xFF
    path.write_bytes(bytes(damaged))


def alter_values_keeping_a_valid_zip(path: Path, teacher) -> None:
    """A whole, readable file whose tensor no longer matches its checksum."""
    entry = load_checkpoint(path)
    entry["outputs"]["logits"][3, 4] += 1.0
    torch.save(entry, path)


def wrong_rows(path: Path, teacher) -> None:
    """A well-formed entry for fewer training images than the data has."""
    outputs = load_checkpoint(path)["outputs"]
    cache._save_entry({field: values[: NUM_TRAIN // 2].clone() for field, values in outputs.items()}, path)


def wrong_logits_width(path: Path, teacher) -> None:
    """A well-formed entry whose logits have a different number of classes."""
    outputs = load_checkpoint(path)["outputs"]
    cache._save_entry({**outputs, "logits": torch.zeros(NUM_TRAIN, 7)}, path)


def older_format(path: Path, teacher) -> None:
    """What earlier versions wrote: a bare {field: tensor} without checksums."""
    torch.save(load_checkpoint(path)["outputs"], path)


DAMAGE = {
    "truncated": (truncate, "truncated or corrupt"),
    "empty": (empty, "truncated or corrupt"),
    "flipped-bytes": (flip_bytes, "truncated or corrupt"),
    "altered-values": (alter_values_keeping_a_valid_zip, "fails its checksum"),
    "wrong-rows": (wrong_rows, "has logits of shape (32, 10), expected (64, 10)"),
    "wrong-logits-width": (wrong_logits_width, "has logits of shape (64, 7), expected (64, 10)"),
    "older-format": (older_format, "older format without checksums"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_entry_is_reported_deleted_and_rebuilt(tmp_path, teacher, data, online, caplog, damage):
    damage_entry, fault = DAMAGE[damage]
    folder = tmp_path / "cache"
    build(teacher, data, folder)
    (path,) = folder.glob("*.pt")
    damage_entry(path, teacher)

    with caplog.at_level(logging.INFO, logger="kdresearch.teacher.outputs"):
        provider = build(teacher, data, folder)
    assert isinstance(provider, CachedTeacher)
    assert_matches_online(provider.outputs, online)
    (warning,) = warnings_of(caplog)
    assert str(path) in warning and fault in warning and "rebuilding" in warning and "\n" not in warning
    assert any("built and saved" in record.getMessage() for record in caplog.records)

    assert [p.name for p in folder.glob("*.pt")] == [path.name] and not list(folder.glob(".*.tmp"))
    assert_valid_entry(path, teacher, online)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdresearch.teacher.outputs"):
        again = build(teacher, data, folder)  # the rebuilt entry is read, silently
    assert not warnings_of(caplog) and any("read from" in r.getMessage() for r in caplog.records)
    assert_matches_online(again.outputs, online)


def test_checksum_covers_bytes_dtype_and_shape():
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    checksum = cache.tensor_checksum(values)
    assert cache.tensor_checksum(values.clone()) == checksum
    assert cache.tensor_checksum(values.reshape(4, 3)) != checksum
    assert cache.tensor_checksum(values.view(torch.int32)) != checksum
    changed = values.clone()
    changed[2, 3] = 11.000001
    assert cache.tensor_checksum(changed) != checksum
    assert cache.tensor_checksum(values.t()) == cache.tensor_checksum(values.t().contiguous())
    assert isinstance(cache.tensor_checksum(values.to(torch.bfloat16)), int)


# --- a full disk, an unusable folder -----------------------------------------------------------

def enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("how", ["oserror", "torch-runtimeerror"])
def test_full_disk_runs_the_teacher_online_and_leaves_no_file(tmp_path, teacher, data, online, caplog,
                                                               monkeypatch, how):
    def save_until_the_disk_is_full(state, stream, *args, **kwargs):
        stream.write(b"PK\x03\x04" + b"\0" * 4096)  # a partial write first
        if how == "oserror":
            raise enospc()
        try:  # how torch.save reports it: a RuntimeError with the OSError as context
            raise enospc()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    folder = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="kdresearch.teacher.outputs"):
        provider = build(teacher, data, folder)

    assert isinstance(provider, OnlineTeacher) and not provider.used_cache
    (warning,) = warnings_of(caplog)
    assert os.strerror(errno.ENOSPC) in warning and "online" in warning and "\n" not in warning
    assert [p for p in folder.iterdir() if p.name != ".locks"] == []
    (lock_path,) = (folder / ".locks").iterdir()
    FileLock(lock_path).acquire(timeout=0).lock.release()  # released despite the failure
    for images, _, index in data.batches("train", 32, DEVICE):
        out = provider(images, index)
        torch.testing.assert_close(out.logits, online["logits"][index], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.stages[1], online["stage1"][index], rtol=1e-5, atol=1e-5)


def test_unusable_cache_folder_runs_the_teacher_online(tmp_path, teacher, data, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.INFO, logger="kdresearch.teacher.outputs"):
        provider = build(teacher, data, blocker / "cache")
    assert isinstance(provider, OnlineTeacher)
    (warning,) = warnings_of(caplog)
    assert str(blocker / "cache") in warning and "online" in warning
