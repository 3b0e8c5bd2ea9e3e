"""Side-by-side speed benchmark: kdresearch's trainer against the tutorial's loop as written.

The baseline is the tutorial's code path: a shuffled DataLoader (batch 128, num_workers=2) over
a dataset that turns each image into a PIL image and applies ToTensor + Normalize, NCHW fp32
models with the tutorial's (not in-place) ReLUs, and the teacher's forward under no_grad on every
student step. It runs in a fresh Python process of its own, so that no setting kdresearch makes
in its process (e.g. `device.keep_freed_memory`) reaches it. kdresearch runs the same
jobs through `kdresearch.trainer.run_job` (in-memory data, channels_last, teacher-output cache,
optionally bf16), with MLflow in a throw-away store. Both use the same data, epochs and batch size.

    python scripts/benchmark.py                          # 10 epochs on ../shared/data/cifar10-real-10k
    python scripts/benchmark.py --epochs 3 --skip-rss    # shorter
    python scripts/benchmark.py --data synthetic         # no CIFAR copy needed
    python scripts/benchmark.py --accuracy-only --seeds 43 44   # accuracy over more seeds

Prints one table of times, images/s, speed-ups and accuracies; `--json PATH` saves the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from kdresearch.config.groups import build
from kdresearch.data.splits import ImageData  # noqa: E402
from kdresearch.models import DeepNN, LightNN, ModelOutputs  # noqa: E402
from kdresearch.pipelines.reproduce import TUTORIAL_TEACHER_RECIPE  # noqa: E402
from kdresearch.training.job import run_job  # noqa: E402

DEFAULT_REAL = ROOT.parent / "shared" / "data" / "cifar10-real-10k"
# The tutorial's five jobs, in order, as kdresearch overrides.
PIPELINE = {"teacher": ["model=deep"], "ce": [], "kd": ["loss=kd"], "cosine": ["loss=cosine"],
            "regressor": ["loss=regressor"]}
KINDS = tuple(PIPELINE)
ACCURACY_TOLERANCE = 1.5  # points: the largest accepted |ours - tutorial| accuracy gap


# --- the tutorial's loop, as written --------------------------------------------------------------

class TutorialDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        import torchvision.transforms as transforms

        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def tutorial_loaders(data: ImageData, batch_size: int):
    train = TutorialDataset(data.train_images, data.train_labels, data.mean, data.std)
    test = TutorialDataset(data.test_images, data.test_labels, data.mean, data.std)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=2),
            torch.utils.data.DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=2))


def tutorial_train(model, teacher, train_loader, epochs, loss_kind, T=2.0, regressor=None):
    """The tutorial's train / train_knowledge_distillation / train_cosine_loss / train_mse_loss."""
    ce_loss = nn.CrossEntropyLoss()
    cosine_loss = nn.CosineEmbeddingLoss()
    mse_loss = nn.MSELoss()
    params = list(model.parameters()) + (list(regressor.parameters()) if regressor is not None else [])
    optimizer = torch.optim.Adam(params, lr=0.001)
    model.train()
    if teacher is not None:
        teacher.eval()
    for _ in range(epochs):
        for inputs, labels in train_loader:
            optimizer.zero_grad()
            if loss_kind == "ce":
                loss = ce_loss(model(inputs), labels)
            else:
                with torch.no_grad():
                    t_out = teacher(inputs, with_features=True)
                s_out = model(inputs, with_features=True)
                label_loss = ce_loss(s_out.logits, labels)
                if loss_kind == "kd":
                    soft_targets = nn.functional.softmax(t_out.logits / T, dim=-1)
                    soft_prob = nn.functional.log_softmax(s_out.logits / T, dim=-1)
                    term = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (T**2)
                elif loss_kind == "cosine":
                    t_hidden = nn.functional.avg_pool1d(t_out.hidden, 2)
                    term = cosine_loss(s_out.hidden, t_hidden, target=torch.ones(inputs.size(0)))
                else:
                    term = mse_loss(regressor(s_out.feature_map), t_out.feature_map)
                loss = 0.25 * term + 0.75 * label_loss
            loss.backward()
            optimizer.step()


def tutorial_test(model, test_loader):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in test_loader:
            predicted = model(inputs).argmax(1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return 100 * correct / total


def as_written(model: nn.Module) -> nn.Module:
    """The tutorial's network as it runs there: ReLUs that allocate their output (kdresearch's work
    in place) and its layers in their literal order (kdresearch pools before each block's last
    ReLU: the same values, less work), features -> flatten -> classifier."""
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False

    def literal_outputs(x):
        stages = []
        for layer in model.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(x)
        hidden = torch.flatten(x, 1)
        embedding = model.classifier[:-1](hidden)
        return ModelOutputs(model.classifier[-1](embedding), embedding, tuple(stages), hidden)

    model.outputs = literal_outputs
    return model


def tutorial_run(kind, data, epochs, batch_size, teacher_state=None, seed=42):
    """One tutorial-style job; returns (seconds, test accuracy, final state_dict)."""
    started = time.perf_counter()
    train_loader, test_loader = tutorial_loaders(data, batch_size)
    teacher = None
    if teacher_state is not None:
        teacher = as_written(DeepNN())
        teacher.load_state_dict(teacher_state)
    torch.manual_seed(seed)
    model = as_written(DeepNN() if kind == "teacher" else LightNN())
    regressor = nn.Conv2d(16, 32, kernel_size=3, padding=1) if kind == "regressor" else None
    tutorial_train(model, teacher, train_loader, epochs, "ce" if kind in ("teacher", "ce") else kind,
                   regressor=regressor)
    accuracy = tutorial_test(model, test_loader)
    return time.perf_counter() - started, accuracy, model.state_dict()


# --- kdresearch ------------------------------------------------------------------------------------

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
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("config", overrides=self.common + list(overrides))

    def run(self, *overrides):
        """(seconds, test accuracy, sum of epoch_seconds) of one full job, start-up included."""
        self.count += 1
        cfg = self.config(*overrides)
        started = time.perf_counter()
        result = run_job(cfg, self.work / f"job{self.count}")
        seconds = time.perf_counter() - started
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.tracking.uri)
        train_seconds = sum(m.value for m in client.get_metric_history(result.run_id, "epoch_seconds"))
        return seconds, result.test_acc, train_seconds, result


def peak_rss_of_full_size_kd(teacher_checkpoint: Path, work: Path) -> float:
    """Peak RSS (GB) of a KD job on 50,000 CIFAR-shaped images (cache built in the job)."""
    command = [sys.executable, str(ROOT / "train.py"), "loss=kd", "data=synthetic", "data.num_train=50000",
               "data.num_test=10000", "epochs=1", "quiet=true", f"teacher.checkpoint={teacher_checkpoint}",
               f"tracking.uri=sqlite:///{work / 'rss.db'}", f"cache.dir={work / 'rss-cache'}",
               f"hydra.run.dir={work / 'rss-job'}"]
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code] + command, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1e6  # ru_maxrss is in KB on Linux


def tutorial_pipeline(data: ImageData, epochs: int, batch_size: int, seed: int) -> dict:
    """The five tutorial-style jobs; its students learn from its own teacher."""
    rows, accuracy = {}, {}
    seconds, accuracy["teacher"], teacher_state = tutorial_run("teacher", data, epochs, batch_size, seed=seed)
    rows["tutorial teacher run"] = seconds
    print(f"  {'tutorial teacher run':<44} {seconds:9.1f} s    test/acc {accuracy['teacher']:.2f}", flush=True)
    for kind in KINDS[1:]:
        seconds, accuracy[kind], _ = tutorial_run(
            kind, data, epochs, batch_size, None if kind == "ce" else teacher_state, seed=seed)
        rows[f"tutorial {kind} run"] = seconds
        print(f"  {f'tutorial {kind} run':<44} {seconds:9.1f} s    test/acc {accuracy[kind]:.2f}", flush=True)
    return {"seconds": rows, "accuracy": accuracy}


def run_baseline_process(args, work: Path, seed: int) -> dict:
    """`tutorial_pipeline` in a fresh interpreter (see the module docstring); returns its numbers."""
    out = work / f"baseline-{seed}.json"
    command = [sys.executable, __file__, "--epochs", str(args.epochs), "--data", args.data,
               "--root", str(args.root), "--batch-size", str(args.batch_size), "--seeds", str(seed),
               "--baseline-only", str(out)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", choices=["cifar10-real-10k", "synthetic"], default="cifar10-real-10k")
    parser.add_argument("--root", type=Path, default=DEFAULT_REAL, help="CIFAR-10 copy for --data cifar10-real-10k")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="training seeds; speed is measured on the first, accuracy averaged over all")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="only the accuracy comparison: no online-KD run, sweep, memory job or speed-ups")
    parser.add_argument("--sweep", type=int, default=8, help="temperatures in the KD sweep")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 50,000-image peak-memory job")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--baseline-only", type=Path, help=argparse.SUPPRESS)  # the baseline's own process
    args = parser.parse_args()

    if args.data == "synthetic":
        data_overrides = ["data=synthetic"]
    else:
        if not (args.root / "cifar-10-batches-py").is_dir():
            sys.exit(f"benchmark: no CIFAR-10 copy at {args.root}; pass --root or --data synthetic")
        data_overrides = [f"data.root={args.root}", "data.verify=false"]
    if args.baseline_only:
        data = build(Ours(Path(tempfile.gettempdir()), data_overrides, args.epochs).config().data, "data")
        numbers = tutorial_pipeline(data, args.epochs, args.batch_size, args.seeds[0])
        args.baseline_only.write_text(json.dumps(numbers))
        return
    work = Path(tempfile.mkdtemp(prefix="kd-bench-"))
    ours = Ours(work, data_overrides, args.epochs)
    data = build(ours.config().data, "data")
    n_train, epochs = len(data.train_labels), args.epochs
    print(f"benchmark: {args.data}, {n_train} training images, {epochs} epochs, batch {args.batch_size}, "
          f"seeds {' '.join(map(str, args.seeds))}, {torch.get_num_threads()} threads, "
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

    for index, seed in enumerate(args.seeds):
        timed = index == 0 and not args.accuracy_only
        teacher_checkpoint = ours_pipeline("fp32", seed)
        if timed:
            teacher_ref = f"teacher.checkpoint={teacher_checkpoint}"
            seconds, _, _, _ = ours.run("loss=kd", "cache.enabled=false", teacher_ref, f"seed={seed}")
            report("ours fp32 kd run, teacher online (no cache)", seconds)
            # A KD sweep over temperatures on the existing teacher, with an empty cache: built once.
            sweep_started = time.perf_counter()
            for T in range(1, args.sweep + 1):
                ours.run("loss=kd", f"T={T}", teacher_ref, f"cache.dir={work / 'sweep-cache'}", f"seed={seed}")
            report(f"ours fp32 kd sweep of {args.sweep} temperatures", time.perf_counter() - sweep_started)
            augmented_sweeps(ours, args.sweep, teacher_ref, seed, work, report)
            rss_teacher = teacher_checkpoint
        ours_pipeline("bf16", seed)
        print(f"tutorial loop (baseline, fresh process), seed {seed}:", flush=True)
        baseline = run_baseline_process(args, work, seed)
        for name, seconds in baseline["seconds"].items():
            rows.setdefault(name, {"seconds": seconds, "images_per_s": None})
        for kind, acc in baseline["accuracy"].items():
            accuracy.setdefault(("tutorial", kind), []).append(acc)

    targets, rss = [], None
    if not args.accuracy_only:
        rss = None if args.skip_rss else peak_rss_of_full_size_kd(rss_teacher, work)
        targets = speed_targets(rows, n_train, epochs, args.sweep)
        print("\nspeed-up over the tutorial loop (same data, epochs, batch size, one run; the last row: ours vs ours):")
        for name, value, target in targets:
            print(f"  {name:<46} {value:6.2f}x   target {target:>4}x   {'met' if value >= target else 'MISSED'}")
    print_accuracy(accuracy, len(args.seeds))
    if rss is not None:
        print(f"\npeak RSS of a 50,000-image KD job (cache built in the job): {rss:.2f} GB (target <= 2.5 GB)")
    if args.json:
        args.json.write_text(json.dumps({
            "rows": rows, "accuracy": {f"{source} {kind}": values for (source, kind), values in accuracy.items()},
            "rss_gb": rss, "targets": targets, "epochs": epochs, "train_images": n_train, "seeds": args.seeds,
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
            histories[(name, T)] = {key: [m.value for m in sorted(client.get_metric_history(result.run_id, key),
                                                                  key=lambda m: m.step)]
                                    for key in ("test/acc", "train/loss")}
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


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    main()
