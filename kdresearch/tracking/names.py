"""The names the project writes to MLflow and searches by: tag keys, the values of tag `role`, and
the one quoting rule for values inside MLflow filter strings.

Every module that sets or filters on one of these uses the constant, so a rename happens here.
"""

from __future__ import annotations

from kdresearch.errors import KDResearchError

# Tag keys every training run carries (see README "What MLflow records").
ROLE = "role"
MODEL = "model"
LOSS = "loss"
CONFIG_HASH = "config_hash"  # the training identity's hash: teacher reuse and sweep continuation
DATA_FINGERPRINT = "data_fingerprint"
DEVICE = "device"
OUTPUT_DIR = "output_dir"  # the job folder, where resume= finds the checkpoints
OVERRIDES = "overrides"
TEACHER_RUN_ID = "teacher_run_id"
TEACHER_CACHE = "teacher_cache"
# A student's teacher (kdresearch.teacher.provenance): its weights' digest, the file they came
# from and its sha256, the bundle that file lies in (kdresearch.sharing; the run it was exported
# from is then TEACHER_RUN_ID), torchvision's weights name, the accuracy its source claims and the
# one it measures on the student's test split.
TEACHER_DIGEST = "teacher_digest"
TEACHER_FILE = "teacher_file"
TEACHER_FILE_SHA256 = "teacher_file_sha256"
TEACHER_BUNDLE = "teacher_bundle"
TEACHER_WEIGHTS = "teacher_weights"
TEACHER_CLAIMED_ACC = "teacher_claimed_acc"
TEACHER_TEST_ACC = "teacher_test_acc"
# Every tag that says where a student's teacher came from (what an export copies as its provenance).
TEACHER_PROVENANCE = (TEACHER_RUN_ID, TEACHER_DIGEST, TEACHER_FILE, TEACHER_FILE_SHA256, TEACHER_BUNDLE,
                      TEACHER_WEIGHTS, TEACHER_CLAIMED_ACC, TEACHER_TEST_ACC, TEACHER_CACHE)
SWEEP = "sweep"  # the multirun folder a job belongs to
SWEEP_DIR = "sweep_dir"  # the folder of a group run (sweep, reproduction, benchmark)
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own: the UI nests children under their parent

# Values of tag `role`.
TEACHER_ROLE = "teacher"  # a cross-entropy run of the teacher model
STUDENT_ROLE = "student"
SWEEP_ROLE = "sweep"  # the parent run of a Hydra multirun
REPRODUCTION_ROLE = "reproduction"  # the parent run of scripts/reproduce_tutorial.py
BENCHMARK_ROLE = "benchmark"  # the parent run of scripts/benchmark_methods.py, holding its table
SUMMARY_ROLE = "summary"  # a comparison's table, logged as its own run
EVALUATION_ROLE = "evaluation"  # an evaluation of a checkpoint from outside the store
# Runs that hold no trained model of their own, never rows of a comparison.
UNTRAINED_ROLES = (SUMMARY_ROLE, SWEEP_ROLE, REPRODUCTION_ROLE, BENCHMARK_ROLE, EVALUATION_ROLE)


def quote(value: str) -> str:
    """`value` as a string literal of an MLflow filter (single quotes, or double when it holds one)."""
    value = str(value)
    if "'" in value and '"' in value:
        raise KDResearchError(f"cannot filter on a value with both quote characters: {value!r}")
    return f'"{value}"' if "'" in value else f"'{value}'"


def tag_equals(key: str, value: str) -> str:
    """The filter clause `tags.<key> = <value>`, the key back-quoted (it may hold dots)."""
    return f"tags.`{key}` = {quote(value)}"
