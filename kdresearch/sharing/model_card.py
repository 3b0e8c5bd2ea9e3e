"""A bundle's README.md: what was trained, on what, how well, and how to check and reuse it.

Everything in it comes from the run as MLflow recorded it (params, tags, latest metrics) and the
epoch of its final checkpoint, so the card says what the run says and nothing else.
"""

from __future__ import annotations

from typing import Mapping, Optional

from kdresearch.sharing import bundle
from kdresearch.tracking import names

NOT_RECORDED = "not recorded"


def model_card(run, epoch: int, folder_name: str) -> str:
    """The card of the MLflow `run` whose final checkpoint is from `epoch`, exported to a folder
    called `folder_name` (what its usage lines name)."""
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    model = tags.get(names.MODEL) or params.get("model.name", NOT_RECORDED)
    has_teacher = any(key in tags for key in names.TEACHER_PROVENANCE)
    teacher = _teacher(params, tags) if has_teacher else "none (trained without a teacher)"
    data = params.get("data.name", NOT_RECORDED)
    fingerprint = tags.get(names.DATA_FINGERPRINT)
    lines = [
        f"# {run.info.run_name or run.info.run_id}",
        "",
        f"A `{model}` model exported from MLflow run `{run.info.run_id}` ({run.info.status.lower()}) by kdresearch.",
        "",
        "| | |",
        "|---|---|",
        f"| model | {model} |",
        f"| teacher | {teacher} |",
        f"| loss | {tags.get(names.LOSS) or params.get('loss.name', NOT_RECORDED)} |",
        f"| data | {data}" + (f" (fingerprint `{fingerprint}`)" if fingerprint else "") + " |",
        f"| seed | {params.get('seed', NOT_RECORDED)} |",
        f"| epochs | {epoch} trained of {params.get('epochs', NOT_RECORDED)} |",
        "",
        "## Accuracy",
        "",
        "| measure | top-1 accuracy |",
        "|---|---|",
        *accuracy_rows(metrics, epoch, tags),
        "",
        "The best epoch is chosen on the validation split; its test accuracy is the figure to report "
        "when there is one.",
        "",
        "## Files",
        "",
        f"- `{bundle.WEIGHTS_FILE}`: the final weights (safetensors); their header names the architecture,"
        " classes, run, epoch and test accuracy",
        f"- `{bundle.CONFIG_FILE}`: the resolved config; `{bundle.COMMAND_FILE}`: the command that started the run",
        f"- `{bundle.METRICS_FILE}`: every metric, one row per epoch",
        f"- `{bundle.LINEAGE_FILE}`: git commit, package versions, hardware"
        + (f"; `{bundle.TEACHER_FILE}`: where the teacher came from" if has_teacher else ""),
        f"- `{bundle.MANIFEST}`: the sha256 of every other file",
        "",
        "## Check it",
        "",
        "```",
        f"cd path/to/{folder_name} && sha256sum -c {bundle.MANIFEST}",
        "```",
        "",
        "## Distil from it",
        "",
        "kdresearch verifies every digest before it loads the weights:",
        "",
        "```",
        f"python train.py loss=kd teacher={params.get('model.name', model)} teacher.checkpoint=path/to/{folder_name}",
        "```",
        "",
    ]
    return "\n".join(lines)


def accuracy_rows(metrics: Mapping[str, float], epoch: int, teacher_tags: Mapping[str, str]) -> list[str]:
    """The table's rows: the final test accuracy, the epoch chosen on validation with its validation
    and test accuracy (when the run held a validation split), the teacher's measured accuracy."""
    rows = [f"| test, final epoch ({epoch}) | {_percent(metrics.get('test/acc'))} |"]
    if "best/val_acc" in metrics:
        best = metrics.get("best/epoch")
        at = f" (epoch {int(best)})" if best is not None else ""
        rows.append(f"| validation, best epoch{at} | {_percent(metrics['best/val_acc'])} |")
        rows.append(f"| test, best epoch on validation{at} | {_percent(metrics.get('best/test_acc'))} |")
    if names.TEACHER_TEST_ACC in teacher_tags:
        rows.append(f"| teacher, test (measured before distillation) | {teacher_tags[names.TEACHER_TEST_ACC]} % |")
    return rows


def _teacher(params: Mapping[str, str], tags: Mapping[str, str]) -> str:
    """The teacher's architecture and where its weights came from."""
    model = params.get("teacher.model.name", NOT_RECORDED)
    if names.TEACHER_BUNDLE in tags:
        where = f"bundle `{tags[names.TEACHER_BUNDLE]}`"
    elif names.TEACHER_FILE in tags:
        where = f"file `{tags[names.TEACHER_FILE]}`"
    elif names.TEACHER_WEIGHTS in tags:
        where = f"torchvision weights {tags[names.TEACHER_WEIGHTS]}"
    else:
        where = None
    run = tags.get(names.TEACHER_RUN_ID)
    parts = [part for part in (where, f"run `{run}`" if run else None) if part]
    digest = tags.get(names.TEACHER_DIGEST)
    if digest:
        parts.append(f"weights sha256 `{digest[:16]}…`")
    return model + (f" ({', '.join(parts)})" if parts else "")


def _percent(value: Optional[float]) -> str:
    return NOT_RECORDED if value is None else f"{value:.2f} %"
