"""Calibration metrics against closed forms and numpy: ECE of calibrated and over-confident predictors, NLL, Brier."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metarun.plots.reliability import reliability_diagram
from metarun import uncertainty as U
from metarun.uncertainty import CalibrationBins, add_bins, bin_means, brier, nll, predictive_log_probs

# Jitted as the evaluator would run them (and one compile each is faster than op-by-op dispatch).
expected_calibration_error = jax.jit(U.expected_calibration_error, static_argnames="bins")
calibration_bins = jax.jit(U.calibration_bins, static_argnames="bins")
calibration_metrics = jax.jit(U.calibration_metrics, static_argnames="bins")
ece_from_bins = jax.jit(U.ece_from_bins)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _calibrated(seed, q, c, temperature=1.0):
    """Labels drawn from softmax(logits); the reported probs are softmax(logits / temperature)."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.normal(size=(q, c))
    p = _softmax(logits)
    labels = (rng.random((q, 1)) > p.cumsum(-1)).sum(-1)  # inverse-CDF sampling from p
    return jnp.asarray(_softmax(logits / temperature), jnp.float32), jnp.asarray(labels)


def test_perfectly_calibrated_predictor_has_ece_near_zero_and_sharpened_one_does_not():
    probs, labels = _calibrated(0, 50_000, 5)
    assert float(expected_calibration_error(probs, labels)) < 0.02
    # Same labels, probabilities sharpened (temperature 0.5): over-confident, so ECE is clearly positive.
    sharp, _ = _calibrated(0, 50_000, 5, temperature=0.5)
    assert float(expected_calibration_error(sharp, labels)) > 0.05


def test_over_confident_predictor_ece_equals_its_analytic_gap():
    # 1000 queries at confidence 0.9 of which exactly 700 are right, 1000 at 0.6 with exactly 400 right:
    # ECE = 0.5 * |0.7 - 0.9| + 0.5 * |0.4 - 0.6| = 0.2 (the two confidences fall in different bins).
    def block(conf, n, n_right):
        p = np.full((n, 3), (1 - conf) / 2, np.float32)
        p[:, 0] = conf
        y = np.where(np.arange(n) < n_right, 0, 1)
        return p, y

    p1, y1 = block(0.9, 1000, 700)
    p2, y2 = block(0.6, 1000, 400)
    probs, labels = np.concatenate([p1, p2]), np.concatenate([y1, y2])
    np.testing.assert_allclose(float(expected_calibration_error(probs, labels)), 0.2, atol=1e-5)
    # Sampled instead of exact: within Monte Carlo error of the same value.
    rng = np.random.default_rng(0)
    y = np.where(rng.random(20_000) < 0.7, 0, 1)
    p = np.tile(p1[:1], (20_000, 1))
    np.testing.assert_allclose(float(expected_calibration_error(p, y)), 0.2, atol=0.015)


def test_bins_follow_guo_edges_and_numpy_ece():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 4, 200)
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, 11)
    ref = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ref += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    np.testing.assert_allclose(float(expected_calibration_error(jnp.asarray(probs, jnp.float32), labels, 10)),
                               ref, rtol=1e-4, atol=1e-6)
    b = calibration_bins(jnp.asarray(probs, jnp.float32), labels, 10)
    np.testing.assert_allclose(np.asarray(b.count), np.histogram(conf, edges)[0])


def test_accumulated_bins_equal_single_shot_ece_on_the_concatenation():
    probs, labels = _calibrated(2, 300, 5, temperature=0.7)
    total = CalibrationBins(*(jnp.zeros(15),) * 3)
    per_episode = []
    for i in range(3):
        sl = slice(100 * i, 100 * (i + 1))
        total = add_bins(total, calibration_bins(probs[sl], labels[sl]))
        per_episode.append(float(expected_calibration_error(probs[sl], labels[sl])))
    pooled = float(ece_from_bins(total))
    np.testing.assert_allclose(pooled, float(expected_calibration_error(probs, labels)), rtol=1e-5)
    # Pooling is not the mean of per-episode ECEs (each episode's ECE carries its own binning noise).
    assert abs(pooled - np.mean(per_episode)) > 1e-3


def test_mask_drops_padded_queries():
    probs, labels = _calibrated(3, 40, 3)
    mask = jnp.arange(40) < 25
    garbage = probs.at[25:].set(jnp.array([1.0, 0.0, 0.0]))
    m = calibration_metrics(jnp.log(garbage), labels, mask=mask)
    full = calibration_metrics(jnp.log(probs[:25]), labels[:25])
    for k in ("ece", "nll", "brier"):
        np.testing.assert_allclose(float(m[k]), float(full[k]), rtol=1e-5)


def test_nll_and_brier_against_numpy_hand_case():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], np.float32)
    labels = np.array([0, 1, 2])
    want_nll = -np.mean(np.log([0.7, 0.1, 0.3]))
    want_brier = np.mean([0.3**2 + 0.2**2 + 0.1**2, 0.1**2 + 0.9**2 + 0.8**2, 0.3**2 + 0.4**2 + 0.7**2])
    np.testing.assert_allclose(float(nll(jnp.log(probs), labels)), want_nll, rtol=1e-6)
    np.testing.assert_allclose(float(brier(probs, labels)), want_brier, rtol=1e-6)


def test_predictive_log_probs_average_probabilities_not_logits():
    logits = jnp.array([[[4.0, 0.0]], [[0.0, 4.0]]])  # two samples that disagree
    np.testing.assert_allclose(np.exp(predictive_log_probs(logits)), [[0.5, 0.5]], rtol=1e-6)
    one = jnp.array([[[1.0, 2.0, 0.5]]])
    np.testing.assert_allclose(predictive_log_probs(one), jax.nn.log_softmax(one[0]), rtol=1e-6)


def test_reliability_diagram_writes_a_png(tmp_path):
    probs, labels = _calibrated(4, 500, 5, temperature=0.6)
    b = calibration_bins(probs, labels)
    conf, acc = bin_means(b)
    out = reliability_diagram(np.asarray(b.count), np.asarray(conf), np.asarray(acc), tmp_path / "d" / "rel.png",
                              "MAML 5w1s")
    data = out.read_bytes()
    assert out == tmp_path / "d" / "rel.png" and len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
