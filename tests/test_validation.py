"""data.val_size: a seeded, class-stratified hold-out; val/acc and val/loss per epoch, and the best
epoch chosen on validation reported with the test accuracy of that same epoch."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import FAST, check_ok, experiment_runs, mlflow_client, train_in_process

from kdresearch.data.splits import stratified_holdout
from kdresearch.data.synthetic import make_synthetic
from kdresearch.errors import KDResearchError


def test_holdout_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = stratified_holdout(labels, 10, seed=0)
    assert len(held) == 10 and len(kept) == 90
    assert set(kept.tolist()).isdisjoint(held.tolist()) and set(kept.tolist()) | set(held.tolist()) == set(range(100))
    assert Counter(labels[held].tolist()) == {0: 5, 1: 3, 2: 2}  # in proportion to 50 / 30 / 20
    again, _ = stratified_holdout(labels, 10, seed=0)
    assert torch.equal(kept, again)
    assert not torch.equal(stratified_holdout(labels, 10, seed=1)[1], held)


def test_holdout_rounds_by_largest_remainder():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)  # 3 of 10: exact shares 1.5 / 0.9 / 0.6
    _, held = stratified_holdout(labels, 3, seed=0)
    assert Counter(labels[held].tolist()) == {0: 1, 1: 1, 2: 1}


def test_val_split_comes_out_of_the_training_set():
    full = make_synthetic(num_train=200, num_test=50)
    split = make_synthetic(num_train=200, num_test=50, val_size=40)
    assert split.train_size == 160 and len(split.val_labels) == 40 and split.has_validation
    assert not full.has_validation
    originals = {bytes(image.numpy().tobytes()) for image in full.train_images}
    held = {bytes(image.numpy().tobytes()) for image in split.val_images}
    kept = {bytes(image.numpy().tobytes()) for image in split.train_images}
    assert held <= originals and kept <= originals and held.isdisjoint(kept)
    assert torch.equal(split.test_images, full.test_images)
    assert split.fingerprint() != full.fingerprint()


@pytest.mark.parametrize("val_size", [-1, 200, "abc", True])
def test_bad_val_size_is_one_line(val_size):
    with pytest.raises(KDResearchError) as raised:
        make_synthetic(num_train=200, num_test=50, val_size=val_size)
    assert "data.val_size must be an integer in [0, 200)" in str(raised.value) and "\n" not in str(raised.value)


def test_job_logs_validation_and_reports_test_at_the_best_validation_epoch(tmp_path):
    check_ok(train_in_process(tmp_path, *FAST, "epochs=3", "data.limit_train=null", "data.num_train=600",
                       "data.val_size=100", "optimizer.lr=0.003"))
    client = mlflow_client(tmp_path)
    (run,) = experiment_runs(client)
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in ("val/acc", "val/loss", "test/acc", "best/epoch", "best/val_acc", "best/test_acc")}
    assert sorted(history["val/acc"]) == sorted(history["val/loss"]) == [1, 2, 3]
    for epoch in (1, 2, 3):
        chosen = max(range(1, epoch + 1), key=lambda e: (history["val/acc"][e], -e))
        assert history["best/epoch"][epoch] == chosen
        assert history["best/val_acc"][epoch] == history["val/acc"][chosen]
        assert history["best/test_acc"][epoch] == history["test/acc"][chosen]
    assert run.data.params["data.val_size"] == "100"
