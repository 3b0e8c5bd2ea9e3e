"""Flattened config keys: {'loss': {'T': 2}} -> {'loss.T': 2}."""

from __future__ import annotations

from typing import Mapping


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    """{'loss': {'T': 2}} -> {'loss.T': 2}; lists stay whole values."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
