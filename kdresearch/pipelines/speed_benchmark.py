"""Side-by-side speed benchmark: kdresearch's trainer against the tutorial's loop as written
(`scripts/benchmark.py`).

The baseline is the tutorial's code path (kdresearch.pipelines.tutorial_baseline), in a fresh
Python process of its own. kdresearch runs the same jobs through
`kdresearch.training.job.run_job` (in-memory data, channels_last, teacher-output cache,
optionally bf16), with MLflow in a throw-away store. Both use the same data, epochs and batch
size. `run_benchmark` prints one table of times, images/s, speed-ups and accuracies, and with
`Settings.json_path` saves the numbers.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kdresearch.config.groups import build
from kdresearch.errors import KDResearchError
from kdresearch.layout import SHARED_CIFAR10_SAMPLE, train_command
from kdresearch.pipelines.reproduce import TUTORIAL_TEACHER_RECIPE
from kdresearch.pipelines.tutorial_baseline import KINDS, baseline_command
from kdresearch.reports.evaluation import compose
from kdresearch.runtime.processes import run_to_end
from kdresearch.tracking.store import metric_history
from kdresearch.training.job import run_job
from kdresearch.training.result import JobResult

DEFAULT_REAL = SHARED_CIFAR10_SAMPLE
DATA_CHOICES = ("cifar10-real-10k", "synthetic")
# The tutorial's five jobs (tutorial_baseline.KINDS), in order, as kdresearch overrides.
PIPELINE = {"teacher": ["model=deep"], "ce": [], "kd": ["loss=kd"], "cosine": ["loss=cosine"],
            "regressor": ["loss=regressor"]}
ACCURACY_TOLERANCE = 1.5  # points: the largest accepted |ours - tutorial| accuracy gap


@dataclass
class Settings:
    epochs: int = 10
    data: str = "cifar10-real-10k"  # one of DATA_CHOICES
    root: Path = DEFAULT_REAL  # the CIFAR-10 copy for data=cifar10-real-10k
    batch_size: int = 128
    seeds: list[int] = field(default_factory=lambda: [42])  # speed from the first, accuracy over all
    accuracy_only: bool = False  # no online-KD run, sweep, memory job or speed-ups
    sweep: int = 8  # temperatures in the KD sweep
    skip_rss: bool = False  # skip the 50,000-image peak-memory job
    json_path: Optional[Path] = None  # also write the numbers here

    def data_overrides(self) -> list[str]:
        if self.data == "synthetic":
            return ["data=synthetic"]
        if not (Path(self.root) / "cifar-10-batches-py").is_dir():
            raise KDResearchError(f"no CIFAR-10 copy at {self.root}; pass --root or --data synthetic")
        return [f"data.root={self.root}", "data.verify=false"]


class Ours:
    """Runs kdresearch jobs in-process on one throw-away MLflow store and teacher cache."""

    def __init__(self, work: Path, data_overrides: list[str], epochs: int):
        self.work = work
        # The students find the pipeline's teacher run: its recipe is the students' own (as in the tutorial).
        self.common = data_overrides + [
            f"epochs={epochs}", "quiet=true", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            f"cache.dir={work / 'cache'}", *TUTORIAL_TEACHER_RECIPE,
        ]
        self.count = 0

    def config(self, *overrides):
        return compose(self.common + list(overrides))

    def run(self, *overrides) -> tuple[float, float, float, JobResult]:
        """(seconds, test accuracy, sum of epoch_seconds, result) of one full job, start-up included."""
        self.count += 1
        cfg = self.config(*overrides)
        started = time.perf_counter()
        result = run_job(cfg, self.work / f"job{self.count}")
        seconds = time.perf_counter() - started
        from mlflow.tracking import MlflowClient

        history = metric_history(MlflowClient(cfg.tracking.uri), result.run_id, ["epoch_seconds"])
        return seconds, result.test_acc, sum(value for _, value in history["epoch_seconds"]), result


def peak_rss_of_full_size_kd(teacher_checkpoint: Path, work: Path) -> float:
    """Peak RSS (GB) of a KD job on 50,000 CIFAR-shaped images (cache built in the job)."""
    command = [*train_command(), "loss=kd", "data=synthetic", "data.num_train=50000",
               "data.num_test=10000", "epochs=1", "quiet=true", f"teacher.checkpoint={teacher_checkpoint}",
               f"tracking.uri=sqlite:///{work / 'rss.db'}", f"cache.dir={work / 'rss-cache'}",
               f"hydra.run.dir={work / 'rss-job'}"]
    # A wrapper process of its own: RUSAGE_CHILDREN of this process would also count the baseline's.
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code] + command, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1e6  # ru_maxrss is in KB on Linux


def run_baseline_process(settings: Settings, work: Path, seed: int) -> dict:
    """The tutorial's five jobs in a fresh interpreter (see tutorial_baseline); returns its numbers."""
    out = work / f"baseline-{seed}.json"
    command = baseline_command(settings.data_overrides(), settings.epochs, settings.batch_size, seed, out)
    code = run_to_end(command)
    if code != 0:
        raise KDResearchError(f"the tutorial baseline process failed (exit code {code})")
    return json.loads(out.read_text())


def run_benchmark(settings: Settings) -> None:
    """Both sides' jobs for every seed, then the speed-ups and accuracies (see the module docstring)."""
    data_overrides = settings.data_overrides()
    work = Path(tempfile.mkdtemp(prefix="kd-bench-"))
    ours = Ours(work, data_overrides, settings.epochs)
    data = build(ours.config().data, "data")
    n_train, epochs = len(data.train_labels), settings.epochs
    print(f"benchmark: {settings.data}, {n_train} training images, {epochs} epochs, batch {settings.batch_size}, "
          f"seeds {' '.join(map(str, settings.seeds))}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, work folder {work}", flush=True)
    rows = {}  # speed numbers, from the first seed's jobs
    accuracy = {}  # (source, kind) -> [test accuracy per seed]

    def report(name, seconds, images=None, acc=None):
        rows.setdefault(name, {"seconds": seconds, "images_per_s": images / seconds if images else None})
        rate = f"{images / seconds:9.1f} img/s" if images else ""
        print(f"  {name:<44} {seconds:9.1f} s {rate}{'' if acc is None else f'   test/acc {acc:.2f}'}", flush=True)

    def ours_pipeline(precision: str, seed: int) -> Path:
        """kdresearch's five jobs from scratch; students find the teacher automatically."""
        print(f"kdresearch {precision} pipeline, seed {seed}:", flush=True)
        for kind, overrides in PIPELINE.items():
            seconds, acc, train_seconds, result = ours.run(f"device.precision={precision}", f"seed={seed}", *overrides)
            report(f"ours {precision} {kind} run", seconds, acc=acc)
            accuracy.setdefault((f"ours {precision}", kind), []).append(acc)
            if kind == "teacher":
                teacher_checkpoint = result.checkpoint
                report(f"ours {precision} teacher training (epochs only)", train_seconds, n_train * epochs)
            if kind == "ce":
                report(f"ours {precision} student CE epoch", train_seconds / epochs)
        rows.setdefault(f"ours {precision} pipeline", {"seconds": sum(
            rows[f"ours {precision} {kind} run"]["seconds"] for kind in KINDS)})
        return teacher_checkpoint

    for index, seed in enumerate(settings.seeds):
        timed = index == 0 and not settings.accuracy_only
        teacher_checkpoint = ours_pipeline("fp32", seed)
        if timed:
            teacher_ref = f"teacher.checkpoint={teacher_checkpoint}"
            seconds, _, _, _ = ours.run("loss=kd", "cache.enabled=false", teacher_ref, f"seed={seed}")
            report("ours fp32 kd run, teacher online (no cache)", seconds)
            # A KD sweep over temperatures on the existing teacher, with an empty cache: built once.
            sweep_started = time.perf_counter()
            for T in range(1, settings.sweep + 1):
                ours.run("loss=kd", f"T={T}", teacher_ref, f"cache.dir={work / 'sweep-cache'}", f"seed={seed}")
            report(f"ours fp32 kd sweep of {settings.sweep} temperatures", time.perf_counter() - sweep_started)
            augmented_sweeps(ours, settings.sweep, teacher_ref, seed, work, report)
            rss_teacher = teacher_checkpoint
        ours_pipeline("bf16", seed)
        print(f"tutorial loop (baseline, fresh process), seed {seed}:", flush=True)
        baseline = run_baseline_process(settings, work, seed)
        for name, seconds in baseline["seconds"].items():
            rows.setdefault(name, {"seconds": seconds, "images_per_s": None})
        for kind, acc in baseline["accuracy"].items():
            accuracy.setdefault(("tutorial", kind), []).append(acc)

    targets, rss = [], None
    if not settings.accuracy_only:
        rss = None if settings.skip_rss else peak_rss_of_full_size_kd(rss_teacher, work)
        targets = speed_targets(rows, n_train, epochs, settings.sweep)
        print("\nspeed-up over the tutorial loop (same data, epochs, batch size, one run; the last row: ours vs ours):")
        for name, value, target in targets:
            print(f"  {name:<46} {value:6.2f}x   target {target:>4}x   {'met' if value >= target else 'MISSED'}")
    print_accuracy(accuracy, len(settings.seeds))
    if rss is not None:
        print(f"\npeak RSS of a 50,000-image KD job (cache built in the job): {rss:.2f} GB (target <= 2.5 GB)")
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps({
            "rows": rows, "accuracy": {f"{source} {kind}": values for (source, kind), values in accuracy.items()},
            "rss_gb": rss, "targets": targets, "epochs": epochs, "train_images": n_train, "seeds": settings.seeds,
        }, indent=2))


def augmented_sweeps(ours: Ours, sweep: int, teacher_ref: str, seed: int, work: Path, report) -> None:
    """The field's recipe augments its data. The same KD sweep with data.augment=true twice: the
    teacher online in every job (cache.enabled=false), and with each epoch's teacher outputs for
    the augmented views computed once and shared (augment_seed fixed, fresh cache). Also checks
    that both give the same metrics."""
    from mlflow.tracking import MlflowClient

    histories = {}
    for name, extra in (("teacher online", ["cache.enabled=false"]),
                        ("shared views", [f"cache.dir={work / 'views-cache'}"])):
        started = time.perf_counter()
        for T in range(1, sweep + 1):
            _, _, _, result = ours.run("loss=kd", f"T={T}", teacher_ref, "data.augment=true", f"augment_seed={seed}",
                                       f"seed={seed}", *extra)
            client = MlflowClient(f"sqlite:///{ours.work / 'mlflow.db'}")
            history = metric_history(client, result.run_id, ("test/acc", "train/loss"))
            histories[(name, T)] = {key: [value for _, value in points] for key, points in history.items()}
        report(f"ours fp32 augmented kd sweep of {sweep}, {name}", time.perf_counter() - started)
    gaps = {key: max(abs(a - b) for T in range(1, sweep + 1)
                     for a, b in zip(histories[("teacher online", T)][key], histories[("shared views", T)][key]))
            for key in ("test/acc", "train/loss")}
    print(f"  shared views vs teacher online, largest difference over the sweep's epochs: test/acc "
          f"{gaps['test/acc']:.4f} points, train/loss {gaps['train/loss']:.2e}", flush=True)


def speed_targets(rows: dict, n_train: int, epochs: int, sweep: int) -> list[tuple[str, float, float]]:
    """(what, speed-up, its target speed-up) for each target, from one seed's timings."""
    rows["tutorial teacher run"]["images_per_s"] = n_train * epochs / rows["tutorial teacher run"]["seconds"]
    rows["tutorial student CE epoch"] = {"seconds": rows["tutorial ce run"]["seconds"] / epochs}
    rows["tutorial pipeline"] = {"seconds": sum(rows[f"tutorial {kind} run"]["seconds"] for kind in KINDS)}
    # Every job of a tutorial-style sweep repeats the same teacher forwards: equal-cost KD runs.
    rows["tutorial kd sweep"] = {"seconds": sweep * rows["tutorial kd run"]["seconds"]}

    def ratio(baseline, ours_key, field="seconds"):
        base, mine = rows[baseline][field], rows[ours_key][field]
        return mine / base if field == "images_per_s" else base / mine

    return [
        ("teacher training img/s, fp32", ratio("tutorial teacher run", "ours fp32 teacher training (epochs only)", "images_per_s"), 1.4),
        ("teacher training img/s, bf16", ratio("tutorial teacher run", "ours bf16 teacher training (epochs only)", "images_per_s"), 2.5),
        ("student CE epoch", ratio("tutorial student CE epoch", "ours fp32 student CE epoch"), 5),
        (f"{epochs}-epoch KD run incl. cache build, fp32", ratio("tutorial kd run", "ours fp32 kd run"), 8),
        (f"{epochs}-epoch KD run incl. cache build, bf16", ratio("tutorial kd run", "ours bf16 kd run"), 10),
        (f"KD sweep of {sweep} temperatures, fp32", ratio("tutorial kd sweep", f"ours fp32 kd sweep of {sweep} temperatures"), 25),
        (f"augmented KD sweep of {sweep}, shared views vs teacher online (ours)",
         ratio(f"ours fp32 augmented kd sweep of {sweep}, teacher online",
               f"ours fp32 augmented kd sweep of {sweep}, shared views"), 3),
        ("five-run pipeline from scratch, fp32", ratio("tutorial pipeline", "ours fp32 pipeline"), 2.3),
        ("five-run pipeline from scratch, bf16", ratio("tutorial pipeline", "ours bf16 pipeline"), 4),
    ]


def print_accuracy(accuracy: dict, seeds: int) -> None:
    """Mean (and spread over seeds) of each job's final test accuracy, ours minus the tutorial's."""
    def cell(values):
        mean = statistics.mean(values)
        return f"{mean:6.2f}" + (f" ± {statistics.stdev(values):4.2f}" if len(values) > 1 else "")

    print(f"\ntest accuracy (%, mean{' ± std' if seeds > 1 else ''} over {seeds} seed{'s' * (seeds > 1)}; "
          f"ours - tutorial within {ACCURACY_TOLERANCE} points?):")
    for kind in KINDS:
        base = statistics.mean(accuracy[("tutorial", kind)])
        line = f"  {kind:<10} tutorial {cell(accuracy[('tutorial', kind)])}"
        for source in ("ours fp32", "ours bf16"):
            gap = statistics.mean(accuracy[(source, kind)]) - base
            verdict = "ok" if abs(gap) <= ACCURACY_TOLERANCE else "OUTSIDE"
            line += f"   {source} {cell(accuracy[(source, kind)])} ({gap:+.2f} {verdict})"
        print(line)
