"""The package is self-contained: a wheel built from the sources, installed (not editable) into a
fresh virtual environment, trains a KD job with its automatic teacher from a folder that is not the
checkout, with the configs that ship inside the wheel.

The fresh environment sees the test environment's packages (torch, MLflow, Hydra, ...) through a
`.pth` file naming their site-packages folder, and gets kdresearch only from the wheel (installed
with --no-deps): a plain path in a `.pth` file adds the folder to sys.path without running the
folder's own `.pth` files, so the checkout's editable install stays out of it.
"""

from __future__ import annotations

import importlib.util
import shutil
import site
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, experiment_runs, mlflow_client, run_command

pytestmark = pytest.mark.slow  # a wheel build, a virtual environment and two training jobs

# What the build reads: the project's metadata and the package (its configs included).
SOURCES = ("pyproject.toml", "README.md", "kdresearch")


def build_wheel(folder: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the sources (the build leaves its build/ folder there, not
    in the checkout); without build isolation when setuptools is at hand (no download needed)."""
    source = folder / "source"
    source.mkdir(parents=True)
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO_ROOT / name, source / name)
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    done = run_command([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(folder / "dist"),
                        str(source)], timeout=600, cwd=folder)
    assert done.returncode == 0, done.output[-5000:]
    (wheel,) = (folder / "dist").glob("kdresearch-*.whl")
    return wheel


def fresh_environment(folder: Path) -> Path:
    """A new virtual environment that sees this one's packages; returns its python."""
    done = run_command([sys.executable, "-m", "venv", "--without-pip", str(folder)], timeout=300)
    assert done.returncode == 0, done.output[-3000:]
    python = folder / "bin" / "python"
    purelib = run_command([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (Path(purelib.stdout.strip()) / "test-environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


def test_installed_wheel_trains_a_kd_job_from_any_folder(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    with zipfile.ZipFile(wheel) as archive:
        assert {"kdresearch/conf/config.yaml", "kdresearch/conf/loss/ce.yaml"} <= set(archive.namelist())

    python = fresh_environment(tmp_path / "venv")
    # The test environment's pip, run by the new interpreter, installs into the new environment.
    done = run_command([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", str(wheel)],
                       timeout=600)
    assert done.returncode == 0, done.output[-5000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    found = run_command([str(python), "-c", "import kdresearch; print(kdresearch.__file__)"], cwd=work)
    assert found.returncode == 0, found.output
    assert Path(found.stdout.strip()).resolve().is_relative_to((tmp_path / "venv").resolve()), found.stdout

    store = tmp_path / "store"
    done = run_command([str(python), "-m", "kdresearch.train", "debug=tiny", "data=synthetic", "loss=kd",
                        f"tracking.uri=sqlite:///{store / 'mlflow.db'}"], timeout=900, one_thread=True, cwd=work)
    assert done.returncode == 0, done.output[-5000:]
    assert "training one first" in done.output  # the automatic teacher

    runs = experiment_runs(mlflow_client(store))
    assert [(run.info.run_name, run.info.status) for run in runs] == [("deep-ce", "FINISHED"),
                                                                       ("light-kd-T2", "FINISHED")]
    teacher, student = runs
    assert teacher.data.tags["role"] == "teacher" and student.data.tags["role"] == "student"
    assert student.data.tags["teacher_run_id"] == teacher.info.run_id
    assert (work / "outputs").is_dir()  # the job folders went to the folder the job ran in
