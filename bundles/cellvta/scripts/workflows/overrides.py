"""Command-line overrides checked against the workflow's configs: a typo is refused, not added as a new key."""

from __future__ import annotations

import difflib
import inspect
import pydoc
from collections.abc import Iterable, Mapping
from typing import Any

from monai.bundle import ConfigComponent
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


def component_arguments(node: Mapping[str, Any]) -> set[str] | None:
    """The keys a component (a dict with ``_target_``) accepts: its target's parameters and MONAI's own keys;
    None when any key may be right (a ``$`` target, a target without a signature, or one taking ``**kwargs``)."""
    target = node.get("_target_")
    if not isinstance(target, str) or target.startswith("$"):
        return None
    found = pydoc.locate(ConfigComponent(dict(node)).resolve_module_name())
    try:
        parameters = inspect.signature(found).parameters.values() if found is not None else None
    except (TypeError, ValueError):
        parameters = None
    if parameters is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters} | ConfigComponent.non_arg_keys


def _split(key: str) -> list[str]:
    for sep in SEPARATORS[1:]:
        key = key.replace(sep, "#")
    return key.split("#")


def unknown_override(key: str, config: Mapping[str, Any], known: Iterable[str]) -> str | None:
    """Why ``key`` is not a valid override of ``config``, with the closest valid key; None when it is valid.

    A key is valid when its whole ``#`` path exists; the last part may also be new when its parent is a
    component (a dict with ``_target_``) that accepts it as an argument (see :func:`component_arguments`).
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
            accepted = component_arguments(node)
            if accepted is None or part in accepted:
                return None
            known = [f"{'#'.join(parts[:-1])}#{name}" for name in sorted(accepted)]
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
