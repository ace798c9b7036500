"""The starting weights of a fine-tuning run when the class table changes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def carry_over(old: Mapping[str, torch.Tensor], old_classes: Sequence[str], new: Mapping[str, torch.Tensor],
               new_classes: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights for a network of ``new_classes`` that keep everything the served network has learnt.

    Tensors of the same name and shape are copied. A tensor whose first dimension is the class count (the
    type head's last layer: weight ``(C, ...)`` and bias ``(C,)``) gets, for each class of ``new_classes``
    that ``old_classes`` also has (by name, case-insensitively), the old row; other rows keep the new
    network's initialisation.

    Args:
        old: the served state dict. old_classes: its class names, background first.
        new: the state dict of a freshly built network of ``new_classes``.

    Returns:
        The state dict for the new network, and the names of the tensors that were not fully carried over.
    """
    old_index = {name.lower(): i for i, name in enumerate(old_classes)}
    rows = [(j, old_index[name.lower()]) for j, name in enumerate(new_classes) if name.lower() in old_index]
    state: dict[str, torch.Tensor] = {}
    partial = []
    for key, fresh in new.items():
        before = old.get(key)
        if before is not None and before.shape == fresh.shape:
            state[key] = before.clone()
        elif (before is not None and before.ndim == fresh.ndim and before.shape[1:] == fresh.shape[1:]
              and before.shape[0] == len(old_classes) and fresh.shape[0] == len(new_classes)):
            merged = fresh.clone()
            for j, i in rows:
                merged[j] = before[i]
            state[key] = merged
            partial.append(key)
        else:
            state[key] = fresh.clone()
            partial.append(key)
    return state, partial
