"""Image completion (issue 11): a regression family whose tasks are images read as functions of 2-D pixel
coordinates (metarun.data.omniglot_completion). Metric: log-likelihood per pixel (or mse).

Differs from the regression family in three ways only: the images live on the device (`data[split]`), the
learner section is not read (only the Neural Processes, which build their own model, run here), and
predictions.png is a grid of images. The Neural Processes ask the family for `record_predictions` at
evaluation (metarun.algos.np_common): the predictive at PLOT_CONTEXT_SIZES context pixels, taken from every
test image at the same fixed pixel positions, drawn for the first PLOTTED_TASKS test tasks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from metarun.errors import UserError
from metarun.families.base import SPLITS
from metarun.families.regression import RegressionFamily
from metarun.registry import register

PLOT_CONTEXT_SIZES = (10, 100)
PLOTTED_TASKS = 4
PLOT_SEED = 0  # the pixel order the plotted contexts take (the same for every image and every algorithm)
RECORD_KEYS = ("_completion_image", "_completion_mean", "_completion_std")


@register("family", "image_completion")
class ImageCompletionFamily(RegressionFamily):
    """Tasks from metarun.data.omniglot_completion.CompletionImages; `kind` stays "regression": every model
    that reads (x, y) sets reads these tasks (x is 2-D)."""
    kind = "regression"
    input_dim = 2  # (row, column): 1D-only models (algo=convcnp) refuse the family by this

    def __init__(self, name: str, images, task_cfg, dataset_cfg):
        super().__init__(name, images, task_cfg, dataset_cfg)
        self.image_size = images.image_size
        self.counts = {s: int(images.images[s].shape[0]) for s in SPLITS}
        self.data = {s: {"images": jnp.asarray(images.images[s])} for s in SPLITS}
        pixels = self.image_size * self.image_size
        self.plot_sizes = tuple(min(k, pixels) for k in PLOT_CONTEXT_SIZES)
        order = jax.random.permutation(jax.random.PRNGKey(PLOT_SEED), pixels)
        self.plot_pixels = np.asarray(order[:max(self.plot_sizes)])

    def sampler(self, split: str):
        if split in self.counts and self.counts[split] == 0:
            raise UserError(f"dataset={self.name}: the {split} split has no images (dataset.split=lake30 has no "
                            f"validation classes): set train.val_every=0")
        return super().sampler(split)

    def describe(self, split: str):
        which = "train" if split == "train" else "test"
        return {"shots": self.shots[which], "queries": self.queries[which], "min_shots": self.min_shots,
                "image_size": self.image_size, "images": self.counts.get(split), "x_range": [-1.0, 1.0],
                "targets": "every pixel", "intensity_range": [0.0, 1.0]}

    def record_predictions(self, predict, ctx, tgt, key) -> Dict[str, jax.Array]:
        """The image and the predictive mean and std [len(plot_sizes), pixels] with the first k pixels of the
        fixed order as the context. predict(ctx, x, mask, key) -> (mean [m, 1], std [m, 1], samples or None)."""
        del ctx  # the plotted contexts are taken from the image itself (the targets are all of its pixels)
        order = jnp.asarray(self.plot_pixels)
        context = {"x": tgt["x"][order], "y": tgt["y"][order]}
        means, stds = [], []
        for i, k in enumerate(self.plot_sizes):
            mask = (jnp.arange(order.shape[0]) < k).astype(tgt["x"].dtype)
            mean, std, _ = predict({**context, "mask": mask}, tgt["x"], tgt["mask"], jax.random.fold_in(key, i))
            means.append(mean[:, 0])
            stds.append(std[:, 0])
        return {"_completion_image": tgt["y"][:, 0], "_completion_mean": jnp.stack(means),
                "_completion_std": jnp.stack(stds)}

    def plots(self, run_dir, per_task: Dict[str, np.ndarray]) -> List[str]:
        """predictions.png: the first PLOTTED_TASKS test images at each plotted context size."""
        if not all(k in per_task for k in RECORD_KEYS):
            return []
        from metarun.plots.completion_predictions import completion_figure  # matplotlib only when drawing

        n = min(PLOTTED_TASKS, len(per_task[RECORD_KEYS[0]]))
        s = self.image_size
        path = completion_figure(
            images=np.asarray(per_task["_completion_image"][:n]).reshape(n, s, s),
            means=np.asarray(per_task["_completion_mean"][:n]).reshape(n, -1, s, s),
            stds=np.asarray(per_task["_completion_std"][:n]).reshape(n, -1, s, s),
            context_pixels=[self.plot_pixels[:k] for k in self.plot_sizes],
            path=Path(run_dir) / "predictions.png", title=f"{self.name}: test images")
        return [path.name]

    def check_learner(self, learner_cfg) -> None:
        if self.uses_learner:
            raise UserError(f"dataset={self.name} is image completion for the Neural Processes (algo=cnp|acnp|np|anp|convcnp); "
                            f"this algorithm reads learner={learner_cfg.name}, which is not supported here")
