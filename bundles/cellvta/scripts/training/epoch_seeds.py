"""Every epoch's randomness from ``(seed, epoch)``, so a resumed run trains as the uninterrupted one would."""

from __future__ import annotations

from typing import Any

import torch
from monai.data.utils import set_rnd
from monai.utils import optional_import, set_determinism

Events, _ = optional_import("ignite.engine", name="Events")
Engine, _ = optional_import("ignite.engine", name="Engine")


class EpochSeeds:
    """Reseed the epoch's random sources when it starts: Python, NumPy and torch (the DataLoader workers' seeds
    derive from torch's), the sampler's own generator and the random transforms of a dataset read in the main
    process (``num_workers: 0``).

    Without it a run resumed after epoch k would draw the samples and augmentations of epoch 1 again, since the
    process starts from the configured seed.

    Args:
        seed: the run's seed; epoch ``e`` uses ``seed + e``.
        sampler: the training sampler, reseeded when it holds a ``generator`` (distributed samplers derive their
            order from their seed and the epoch already).
        dataset: the training dataset, whose random transforms are reseeded.
    """

    def __init__(self, seed: int, sampler: Any = None, dataset: Any = None) -> None:
        self.seed = int(seed)
        self.sampler = sampler
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch_seed = self.seed + engine.state.epoch
        set_determinism(seed=epoch_seed)
        generator = getattr(self.sampler, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed)
        if self.dataset is not None:
            set_rnd(self.dataset, epoch_seed)
