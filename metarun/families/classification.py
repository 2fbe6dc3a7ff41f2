"""Few-shot classification: N-way K-shot episodes sampled on the device from images[class, example, ...]."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarun.data.tasks import make_image_sampler, make_labelled_image_sampler
from metarun.errors import UserError
from metarun.families.augmenting import augment_from_config, augmented
from metarun.families.base import SPLITS, TaskFamily, check_positive
from metarun.registry import register
from metarun.regularize import smoothed_cross_entropy
from metarun.uncertainty import brier, calibration_bins, nll


@dataclass(frozen=True)
class EpisodeShape:
    ways: int
    shots: int
    queries: int


def episode_shapes(task_cfg) -> Dict[str, EpisodeShape]:
    """Training episodes use task.{ways,shots,queries}; val and test use the test_* values when set."""
    train = EpisodeShape(task_cfg.ways, task_cfg.shots, task_cfg.queries)
    test = EpisodeShape(task_cfg.get("test_ways") or train.ways, task_cfg.get("test_shots") or train.shots,
                        task_cfg.get("test_queries") or train.queries)
    return {"train": train, "val": test, "test": test}


# Calibration bins per episode (Guo et al. 2017: 15 equal-width confidence bins). The per-episode bin sums
# travel as one [3, BINS] array metric (count, confidence sum, correct sum) and are pooled over all test
# episodes in `summarize`: the ECE of all test queries, not a mean of per-episode ECEs.
CALIBRATION_BINS = 15
BINS_KEY = "_calibration_bins"  # "_": an array, not a per-episode number to average (summarize pools it)


def calibration_from_log_probs(log_probs, labels, mask=None) -> dict:
    """The calibration metrics of one episode from normalised log-probabilities [q, C]: nll, brier, and
    the per-episode bins (BINS_KEY) that summarize pools into the test set's ECE."""
    probs = jnp.exp(log_probs)
    bins = calibration_bins(probs, labels, CALIBRATION_BINS, mask)
    return {"nll": nll(log_probs, labels, mask), "brier": brier(probs, labels, mask),
            BINS_KEY: jnp.stack([bins.count, bins.confidence, bins.correct])}


def classification_objective(logits, labels, mask=None):
    """Cross-entropy of softmax(logits); accuracy; and the calibration of softmax(logits) (NLL, Brier, ECE bins).

    The loss ignores `mask` (classification episodes are never padded); the calibration metrics honour it.
    Algorithms whose outputs are log-probabilities (Matching Nets, Bayesian predictive averages) pass them
    as logits: log_softmax leaves normalised log-probabilities unchanged.
    """
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    log_probs = jax.nn.log_softmax(logits, -1)
    accuracy = (jnp.argmax(logits, -1) == labels).mean()
    # NLL equals the loss here, but stays a separate key: algorithms that train on another loss (DKT's
    # marginal likelihood, BMAML's chaser loss) report the predictive NLL under the same name.
    return loss, {"loss": loss, "accuracy": accuracy, **calibration_from_log_probs(log_probs, labels, mask)}


def ece_with_ci(bins: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict:
    """The pooled ECE and a 95% half-width over episodes: 1.96 x the standard deviation of the pooled ECE
    over episodes resampled with replacement (a bootstrap: ECE is not a mean of per-episode values, so the
    normal formula of the other metrics does not apply). Non-finite bins (a diverged run) give None."""
    bins = np.asarray(bins, np.float64)
    n = bins.shape[0]
    if n == 0 or not np.isfinite(bins).all():
        return {"mean": None, "ci95": None, "n": int(n)}

    def ece(total):  # numpy twin of uncertainty.ece_from_bins over a leading resample axis
        return np.abs(total[..., 2, :] - total[..., 1, :]).sum(-1) / np.maximum(total[..., 0, :].sum(-1), 1.0)

    # Each resample as episode multiplicities [R, n] times the bins: [R, 3, M] without an [R, n, 3, M] copy.
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    boot = ece((counts @ bins.reshape(n, -1)).reshape((resamples,) + bins.shape[1:]))
    return {"mean": float(ece(bins.sum(0))), "ci95": float(1.96 * boot.std(ddof=1)) if n > 1 else 0.0, "n": int(n)}


@register("family", "classification")
class ClassificationFamily(TaskFamily):
    """N-way K-shot episodes; metric accuracy (higher is better); labels relabelled 0..N-1 per episode."""
    kind = "classification"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, name: str, arrays: Dict[str, np.ndarray], task_cfg, dataset_cfg, augment=None,
                 label_smoothing: float = 0.0, train_tasks: str = "episodes"):
        check_positive("task", task_cfg, ("ways", "shots", "queries", "test_ways", "test_shots", "test_queries"))
        super().__init__(name, {s: jax.device_put(np.ascontiguousarray(a)) for s, a in arrays.items()})
        self.num_classes = {s: int(a.shape[0]) for s, a in arrays.items()}
        self.examples_per_class = int(min(a.shape[1] for a in arrays.values()))
        self.image_shape = tuple(next(iter(arrays.values())).shape[2:])
        self.shapes = episode_shapes(task_cfg)
        self.class_split = dataset_cfg.get("split")
        # Issue 15 techniques: augmentation of training tasks; smoothing of the optimised cross-entropy.
        self.augment = augment_from_config(augment)
        self.label_smoothing = float(label_smoothing)
        # What the training split yields: N-way K-shot episodes, or (algo=pretrain) single labelled images
        # that the trainer stacks into minibatches over all training classes.
        if train_tasks not in ("episodes", "batches"):
            raise ValueError(f"train_tasks={train_tasks!r}: expected episodes or batches")
        self.train_tasks = train_tasks

    def objective(self, logits, labels, mask=None):
        loss, metrics = classification_objective(logits, labels, mask)
        if self.label_smoothing:  # the optimised loss (inner and outer); nll and calibration stay unsmoothed
            loss = smoothed_cross_entropy(logits, labels, self.label_smoothing)
            metrics = {**metrics, "loss": loss}
        return loss, metrics

    def ways(self, phase: str) -> int:
        return self.shapes["train" if phase == "train" else "test"].ways

    def head_dim(self, phase: str) -> int:
        """A learner's head has one output per class; it is trained once, so the test episodes must
        have as many classes (metric learners, which ask `ways`, are free to change it)."""
        train, test = self.ways("train"), self.ways("eval")
        if train != test:
            raise UserError(f"a head-based algorithm has a {train}-way head: task.test_ways (or eval.ways)={test} "
                            f"must equal task.ways={train}; only metric learners (protonet, matchingnet, "
                            f"relationnet, dkt) change ways between training and test")
        return train

    def sampler(self, split: str):
        if split not in SPLITS:
            raise UserError(f"split {split!r} is unknown; expected one of: {', '.join(SPLITS)}")
        if split == "train" and self.train_tasks == "batches":
            sample = make_labelled_image_sampler()
            return augmented(sample, self.augment) if self.augment is not None else sample
        shape = self.shapes[split]
        n = self.num_classes[split]
        if n == 0:  # e.g. Omniglot's lake30: all background alphabets train, none is held out
            raise UserError(f"dataset={self.name} with dataset.split={self.class_split} has no '{split}' classes"
                            + ("; train without validation: train.val_every=0" if split == "val" else ""))
        if shape.ways > n:
            raise UserError(f"task ways={shape.ways} exceeds the {n} classes of the '{split}' split of "
                            f"dataset={self.name}; choose task.ways (or task.test_ways) <= {n}")
        if shape.shots + shape.queries > self.examples_per_class:
            raise UserError(f"task shots+queries={shape.shots + shape.queries} exceeds the "
                            f"{self.examples_per_class} examples per class of dataset={self.name}")
        sample = make_image_sampler(shape.ways, shape.shots, shape.queries)
        # Training tasks only: validation and test episodes are the fixed, unaugmented protocol.
        return augmented(sample, self.augment) if split == "train" and self.augment is not None else sample

    def summarize(self, per_task: Dict[str, np.ndarray]) -> Dict[str, Any]:
        """Accuracy ± 95% CI and every other metric ± CI, plus `ece`: the ECE of all test queries pooled
        over the episodes (15 equal-width bins) with a bootstrap CI over episodes. Algorithms whose
        outputs are not probabilities (Relation Nets' scores) return no bins and get no ECE/NLL/Brier."""
        out = super().summarize(per_task)
        if BINS_KEY in per_task:
            ece = ece_with_ci(per_task[BINS_KEY])
            out["metrics"]["ece"] = {"mean": ece["mean"], "ci95": ece["ci95"]}
        return out

    def plots(self, run_dir, per_task: Dict[str, np.ndarray]) -> List[str]:
        """reliability.png: per-bin accuracy against confidence over all test queries (when the algorithm
        returns probabilities, see `summarize`)."""
        bins = per_task.get(BINS_KEY)
        if bins is None or not np.isfinite(bins).all():
            return []
        from metarun.plots.reliability import reliability_diagram  # matplotlib only when a plot is drawn

        count, conf_sum, correct = np.asarray(bins, np.float64).sum(0)  # pooled over episodes, as the ECE
        path = reliability_diagram(count, conf_sum / np.maximum(count, 1.0), correct / np.maximum(count, 1.0),
                                   Path(run_dir) / "reliability.png", title=f"{self.name} test")
        return [path.name]

    def describe(self, split: str):
        s = self.shapes[split]
        return {"ways": s.ways, "shots": s.shots, "queries": s.queries, "class_split": self.class_split}

    def check_learner(self, learner_cfg) -> None:
        if learner_cfg.name == "mlp":
            raise UserError(f"learner=mlp is for vector inputs; dataset={self.name} has images: use learner=conv4")
        blocks = learner_cfg.get("blocks")
        if blocks is not None:
            side = min(self.image_shape[:2])
            if side < 2 ** blocks:
                raise UserError(f"dataset.image_size={side} is too small for learner.blocks={blocks} "
                                f"(each block halves the image): use an image size >= {2 ** blocks} or fewer blocks")
