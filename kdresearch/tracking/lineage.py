"""Which code, on which machine, produced a run: the tags every run carries.

Runs are created with `MlflowClient.create_run`, which (unlike the fluent `mlflow.start_run`)
records no source, commit or user, so they are set here: `mlflow.source.*` and `mlflow.user` (the
names MLflow's UI shows in its Source and User columns), `git.dirty` with the uncommitted changes
as an artifact, the versions of the packages that decide a number, and the hardware. The git
facts describe the checkout kdresearch itself is imported from; outside a git checkout (an
installed wheel, a copied folder, no `git` program) those tags are simply absent.
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Mapping, Optional

from kdresearch.layout import PROJECT_ROOT

VERSIONED_PACKAGES = ("torch", "torchvision", "hydra-core", "mlflow", "kdresearch")
# The keys `lineage_tags` writes, by prefix (mlflow.user is a whole key).
LINEAGE_TAG_PREFIXES = ("mlflow.source.", "mlflow.user", "host.", "version.", "git.")


@dataclass(frozen=True)
class GitState:
    commit: str
    branch: Optional[str]
    remote: Optional[str]
    diff: str  # `git diff HEAD` plus the untracked files' names; empty for a clean tree

    @property
    def dirty(self) -> bool:
        return bool(self.diff)


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git program, or it hangs
        return None
    return done.stdout if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> Optional[GitState]:
    """The project checkout's commit and uncommitted changes; None outside a git checkout.
    Computed once per process: every job of an in-process sweep runs the same code."""
    top = _git("rev-parse", "--show-toplevel")
    if not top or Path(top.strip()).resolve() != PROJECT_ROOT:
        return None  # kdresearch is not the top of a checkout (installed, or inside another repo)
    commit = (_git("rev-parse", "HEAD") or "").strip()
    if not commit:
        return None  # a repository without commits
    branch = (_git("rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    remote = (_git("config", "--get", "remote.origin.url") or "").strip()
    diff = _git("diff", "HEAD", "--no-color") or ""
    untracked = (_git("ls-files", "--others", "--exclude-standard") or "").split()
    if untracked:
        diff += "".join(f"# untracked file (content not recorded): {name}\n" for name in untracked)
    return GitState(commit, branch if branch and branch != "HEAD" else None, remote or None, diff)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def cpu_model() -> str:
    """The CPU's marketing name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def entry_point() -> str:
    """The script that started the process, relative to the project when it lies inside it."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or not script.is_file():
        return "python"
    try:
        return str(script.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(script)


def lineage_tags() -> dict[str, str]:
    """Tags for a new run: source, user, git commit and dirty flag, versions, hardware."""
    import torch

    tags = {
        "mlflow.source.name": entry_point(),
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
        "host.name": platform.node(),
        "host.cpu": cpu_model(),
        "host.cpu_count": str(os.cpu_count()),
        "host.threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        tags["host.gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    tags.update({f"version.{name}": version for name, version in package_versions().items()})
    git = git_state()
    if git is not None:
        tags["mlflow.source.git.commit"] = git.commit
        tags["git.dirty"] = str(git.dirty).lower()
        if git.branch:
            tags["mlflow.source.git.branch"] = git.branch
        if git.remote:
            tags["mlflow.source.git.repoURL"] = git.remote
    return tags


def recorded_lineage(tags: Mapping[str, str]) -> dict[str, str]:
    """The lineage tags among a run's `tags` (those `lineage_tags` wrote), sorted by key."""
    return {key: tags[key] for key in sorted(tags) if key.startswith(LINEAGE_TAG_PREFIXES)}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"
