"""`GuideScorer`: latent distances s = ||phi(x, gold) - phi(x, sample)||_2 for a batch of rows.

A callable class for Ray Data (`ds.map_batches(GuideScorer, fn_constructor_kwargs={"guide_path":
...}, batch_format="numpy", concurrency=..., num_gpus=...)`): it loads the guide's encoder once
per actor, reads columns `prompt`, `gold`, `sample` and returns the batch with a float64
`distance` column added. It imports nothing from Ray, so a Serve deployment or any other
process can hold one too.
"""

from __future__ import annotations

import numpy as np

from rayalign.guide import GuideModel, resolve_device

COLUMNS = ("prompt", "gold", "sample")


class GuideScorer:
    def __init__(self, guide_path: str, batch_size: int = 64, device: str = "auto"):
        self.guide = GuideModel.load(guide_path, resolve_device(device), decoder=False)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in COLUMNS if c not in batch]
        if missing:
            raise KeyError(f"GuideScorer: batch lacks column(s) {missing}; has {sorted(batch)}")
        columns = {}
        for name in COLUMNS:
            values = list(batch[name])
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise TypeError(f"GuideScorer: column {name!r}, batch row {bad}: expected a "
                                f"string, got {type(values[bad]).__name__}")
            columns[name] = values
        distance = self.guide.distances(columns["prompt"], columns["gold"], columns["sample"],
                                        self.batch_size)
        return {**batch, "distance": distance.numpy()}
