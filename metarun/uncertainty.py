"""Calibration metrics for classification (ECE, NLL, Brier) and the Bayesian predictive, in pure jax.numpy."""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class CalibrationBins(NamedTuple):
    """Per-bin sums over the queries seen so far; add two of these leaf by leaf to pool episodes.

    count:       [bins] number of queries whose confidence falls in the bin.
    confidence:  [bins] sum of those queries' confidences (max predicted probability).
    correct:     [bins] how many of them the argmax got right.
    """
    count: jax.Array
    confidence: jax.Array
    correct: jax.Array


def _weights(labels, mask):
    return jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def _weighted(values, w):
    # where, not a product alone: a padded query's -inf or NaN must not leak through 0 * inf = NaN.
    return jnp.where(w > 0, values * w, 0.0)


def calibration_bins(probs, labels, bins: int = 15, mask: Optional[jax.Array] = None) -> CalibrationBins:
    """Sorts queries into `bins` equal-width confidence bins ((m-1)/M, m/M] (Guo et al. 2017).

    Args:
      probs: [q, C] predicted class probabilities.
      labels: [q] int true classes.
      bins: the number of equal-width bins M over [0, 1]; static.
      mask: optional [q] weights (1 = real query, 0 = padding), so padded episodes share one compiled shape.

    Returns:
      CalibrationBins of shape [bins]; `add_bins` pools them over episodes, `ece_from_bins` reads the ECE.
    """
    w = _weights(labels, mask)
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(jnp.float32)
    # Bin m holds (m/M, (m+1)/M]: ceil puts a confidence exactly on an edge in the lower bin, as Guo et al.
    index = jnp.clip(jnp.ceil(confidence * bins).astype(jnp.int32) - 1, 0, bins - 1)

    def per_bin(values):
        return jax.ops.segment_sum(_weighted(values, w), index, num_segments=bins)

    return CalibrationBins(per_bin(jnp.ones_like(confidence)), per_bin(confidence), per_bin(correct))


def add_bins(a: CalibrationBins, b: CalibrationBins) -> CalibrationBins:
    """Pools two bin tallies (e.g. a running total and one episode's): sums, so the order does not matter."""
    return jax.tree.map(jnp.add, a, b)


def ece_from_bins(bins: CalibrationBins) -> jax.Array:
    """ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| = sum_m |correct_m - confidence_m| / n; 0 when n = 0."""
    n = bins.count.sum()
    return jnp.abs(bins.correct - bins.confidence).sum() / jnp.maximum(n, 1.0)


def expected_calibration_error(probs, labels, bins: int = 15, mask: Optional[jax.Array] = None) -> jax.Array:
    """The expected calibration error of one set of queries (one episode), equal-width bins (Guo et al. 2017).

    Args:
      probs: [q, C] predicted class probabilities.
      labels: [q] int true classes.
      bins: the number of equal-width confidence bins.
      mask: optional [q] weights, 0 for padded queries.
    """
    return ece_from_bins(calibration_bins(probs, labels, bins, mask))


def bin_means(bins: CalibrationBins):
    """(mean confidence [bins], accuracy [bins]) per bin, 0 in empty bins: what a reliability diagram draws."""
    denom = jnp.maximum(bins.count, 1.0)
    return bins.confidence / denom, bins.correct / denom


def nll(log_probs, labels, mask: Optional[jax.Array] = None) -> jax.Array:
    """Mean over queries of -log p(true class).

    Args:
      log_probs: [q, C] predictive log-probabilities (log_softmax of logits, or `predictive_log_probs`).
      labels: [q] int true classes.
      mask: optional [q] weights, 0 for padded queries.
    """
    w = _weights(labels, mask)
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return -_weighted(picked, w).sum() / jnp.maximum(w.sum(), 1.0)


def brier(probs, labels, mask: Optional[jax.Array] = None) -> jax.Array:
    """Brier score: mean over queries of sum over classes of (p_c - 1[c = y])^2 (0 perfect, 2 worst).

    Args:
      probs: [q, C] predicted class probabilities.
      labels: [q] int true classes.
      mask: optional [q] weights, 0 for padded queries.
    """
    w = _weights(labels, mask)
    err = jnp.square(probs - jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)).sum(-1)
    return _weighted(err, w).sum() / jnp.maximum(w.sum(), 1.0)


def predictive_log_probs(sample_logits) -> jax.Array:
    """log of the Bayesian model average (1/S) sum_s softmax(logits_s): [S, q, C] -> [q, C].

    Averages probabilities, not logits (the posterior predictive); logsumexp keeps it stable.
    """
    s = sample_logits.shape[0]
    return jax.nn.logsumexp(jax.nn.log_softmax(sample_logits, -1), axis=0) - jnp.log(s)


def calibration_metrics(log_probs, labels, bins: int = 15, mask: Optional[jax.Array] = None) -> dict:
    """One episode's {"ece", "nll", "brier"} from predictive log-probabilities [q, C], for a 95% CI over episodes."""
    probs = jnp.exp(log_probs)
    return {"ece": expected_calibration_error(probs, labels, bins, mask),
            "nll": nll(log_probs, labels, mask), "brier": brier(probs, labels, mask)}
