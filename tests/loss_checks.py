"""Checks the method tests share: a refusal is one line, a loss config builds its class with the
authors' defaults, a pair a loss cannot serve is refused naming both models.

Usage::

    with pytest.raises(KDResearchError) as raised:
        SoftmaxRegression().bind(student, teacher)
    assert_pair_refused(raised, "srd", student, teacher, "teacher and student need the same classes")
    assert_builds_defaults("srd", SoftmaxRegression, {"T": 4.0, ...})
"""

from __future__ import annotations

from conftest import compose_config

from kdresearch.config.groups import build


def one_line(raised) -> str:
    """The message of a `pytest.raises` result, asserted to be one line."""
    message = str(raised.value)
    assert "\n" not in message
    return message


def assert_pair_refused(raised, loss: str, student, teacher, problem: str) -> None:
    """`bind` refused the pair in one line that names the loss, the problem and both models."""
    message = one_line(raised)
    assert message.startswith(f"loss={loss}: ") and problem in message
    assert f"student {student.describe()}" in message and f"teacher {teacher.describe()}" in message


def assert_builds_defaults(name: str, cls: type, expected: dict) -> None:
    """conf/loss/<name>.yaml offers exactly the keys of `expected` (every option a loss.<key>) and
    builds `cls` holding those values."""
    node = compose_config(f"loss={name}").loss
    assert node.name == name and set(node) - {"name", "_target_"} == set(expected)  # every option a loss.<key>
    loss = build(node, "loss")
    assert type(loss) is cls
    assert {key: getattr(loss, key) for key in expected} == expected
