"""A bundle: one run's results in a plain folder that another lab can check without our MLflow store
(kdresearch.sharing.export writes it; `teacher.checkpoint=<bundle>` reads it as a teacher).

    README.md            the model card: the accuracy table; model, teacher, loss, data, seed, epochs
    weights.safetensors  the run's final weights (its checkpoints/final.pt), with what they are in the
                         file's own header (META_KEY below)
    config.yaml          the resolved config the run trained with
    command.txt          the command line that started it
    metrics.csv          every metric of the run, one row per step (the epoch), one column per metric
    system_metrics.csv   MLflow's CPU / memory / GPU samples, one row per sample (only if it took any)
    teacher.json         the teacher's provenance (a run that distilled from a teacher)
    lineage.json         git commit and dirty flag, package versions, hardware, entry point
    git_diff.patch       the uncommitted changes it was trained with (a dirty checkout only)
    SHA256SUMS           the sha256 of every other file, as `sha256sum` writes them

A reader checks the files with `sha256sum -c SHA256SUMS`; the loader checks them the same way
(`verify_manifest`) before it reads a byte of the weights, so a file changed or damaged since the
export is refused, naming it. The digests catch changes, not forgery: whoever can rewrite the
weights can rewrite SHA256SUMS too, so a lab that must know publishes SHA256SUMS's own digest.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from kdresearch.digests import file_digest
from kdresearch.errors import KDResearchError

MANIFEST = "SHA256SUMS"
WEIGHTS_FILE = "weights.safetensors"
MODEL_CARD = "README.md"
CONFIG_FILE = "config.yaml"
COMMAND_FILE = "command.txt"
METRICS_FILE = "metrics.csv"
SYSTEM_METRICS_FILE = "system_metrics.csv"
TEACHER_FILE = "teacher.json"
LINEAGE_FILE = "lineage.json"
GIT_DIFF_FILE = "git_diff.patch"

# The weights file's header metadata: one key, META_KEY, holding a JSON object with what the loader
# needs besides the tensors, so the file is complete on its own. One key, because safetensors writes
# several in a random order, and an export must give the same bytes each time.
META_KEY = "kdresearch"
WEIGHTS_FORMAT = "kdresearch-bundle/1"
META_FORMAT = "format"
META_MODEL_CLASS = "model_class"  # as a checkpoint's `model_class`: load_weights refuses another architecture
META_NUM_CLASSES = "num_classes"
META_RUN_ID = "run_id"  # the MLflow run the bundle was exported from
META_EPOCH = "epoch"
META_TEST_ACC = "test_acc"  # the final test accuracy (percent): what the weights claim as a teacher

# One line of SHA256SUMS: the digest, then two spaces (text mode) or " *" (binary mode), then the name.
MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def is_bundle(folder: Path) -> bool:
    """Whether `folder` is a bundle (it holds SHA256SUMS) rather than a job folder."""
    return (Path(folder) / MANIFEST).is_file()


def write_manifest(folder: Path) -> Path:
    """SHA256SUMS over every file under `folder` (itself excepted), sorted by name; returns its path."""
    folder = Path(folder)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                   if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST)
    manifest = folder / MANIFEST
    manifest.write_text("".join(f"{file_digest(folder / name)}  {name}\n" for name in files), encoding="utf-8")
    return manifest


def read_manifest(folder: Path, described: str = "") -> dict[str, str]:
    """{file name: sha256} as SHA256SUMS lists them, or one line saying which line is not one.
    `described` names the bundle in messages (default: "bundle <folder>")."""
    folder = Path(folder)
    described = described or f"bundle {folder}"
    listed: dict[str, str] = {}
    try:
        lines = (folder / MANIFEST).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise KDResearchError(f"{described}: cannot read {MANIFEST} ({error})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        match = MANIFEST_LINE.match(line)
        if match is None:
            raise KDResearchError(f"{described}: {MANIFEST} line {number} is not '<sha256>  <file>'")
        digest, name = match.group(1).lower(), match.group(2)
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts:  # a listed name must not reach outside the bundle
            raise KDResearchError(f"{described}: {MANIFEST} line {number} names {name!r}, outside the bundle")
        listed[name] = digest
    return listed


def verify_manifest(folder: Path, described: str = "") -> dict[str, str]:
    """Check every file SHA256SUMS lists against its digest (the weights file must be listed);
    returns the listing, or refuses in one line naming the first file that is missing or differs.
    `described` names the bundle in messages (default: "bundle <folder>")."""
    folder = Path(folder)
    described = described or f"bundle {folder}"
    listed = read_manifest(folder, described)
    if WEIGHTS_FILE not in listed:
        raise KDResearchError(f"{described}: {MANIFEST} does not list {WEIGHTS_FILE}, so its weights "
                              f"cannot be checked")
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise KDResearchError(f"{described}: {name} is listed in {MANIFEST} but missing")
        if file_digest(path) != digest:
            raise KDResearchError(f"{described}: {name} does not match its sha256 in {MANIFEST} "
                                  f"(changed or damaged since the export); refusing the bundle")
    return listed
