"""Command-line overrides checked against the workflow's configs: a typo is refused, not added as a new key."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from monai.bundle.utils import ID_SEP_KEY

SEPARATORS = ("#", ID_SEP_KEY)


def config_ids(config: Any, prefix: str = "") -> list[str]:
    """Every id of ``config``: top-level keys and the ``#`` paths to every nested dict key and list index."""
    items = config.items() if isinstance(config, Mapping) else enumerate(config) if isinstance(config, list) else ()
    ids = []
    for key, value in items:
        sub = f"{prefix}#{key}" if prefix else str(key)
        ids.append(sub)
        ids.extend(config_ids(value, sub))
    return ids


def _split(key: str) -> list[str]:
    for sep in SEPARATORS[1:]:
        key = key.replace(sep, "#")
    return key.split("#")


def unknown_override(key: str, config: Mapping[str, Any], known: Iterable[str]) -> str | None:
    """Why ``key`` is not a valid override of ``config``, with the closest valid key; None when it is valid.

    A key is valid when its whole ``#`` path exists; the last part may also be new when its parent is a
    component (a dict with ``_target_``), whose new keys become constructor arguments.
    """
    parts = _split(key)
    node: Any = config
    for depth, part in enumerate(parts):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
            continue
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if depth == len(parts) - 1 and depth > 0 and isinstance(node, Mapping) and "_target_" in node:
            return None
        close = difflib.get_close_matches("#".join(parts), list(known), n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else ""
        return f"--{key}: no key {'#'.join(parts[: depth + 1])!r} in the workflow's configs{hint}"
    return None


def check_overrides(overrides: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming every override key that ``config`` does not define.

    Args:
        overrides: the command line's ``--key value`` pairs (keys may be ``#`` paths: ``train#dataloader#batch_size``).
        config: the workflow's merged config files.
    """
    known = config_ids(config)
    problems = [p for p in (unknown_override(k, config, known) for k in overrides) if p]
    if problems:
        raise ValueError("; ".join(problems))
