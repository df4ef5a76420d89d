"""Postprocessing: temperature-scaled probabilities and the seed's result shape."""

import numpy as np
import pytest
import torch

from predictor.cifar import CLASSES
from predictor.dataplane import calibrated
from predictor.payloads import classification
from predictor.training.calibration import expected_calibration_error, fit_temperature


def test_probabilities_sum_to_one_and_keep_the_argmax():
    logits = np.random.default_rng(0).normal(0, 5, (50, 10)).astype(np.float32)
    for temperature in (0.5, 1.0, 2.7):
        for row in logits:
            p = calibrated(row, temperature)
            assert p.sum() == pytest.approx(1.0, abs=1e-6)
            assert p.argmax() == row.argmax()


def test_higher_temperature_lowers_confidence():
    row = np.array([4.0, 1.0] + [0.0] * 8, dtype=np.float32)
    assert calibrated(row, 2.0).max() < calibrated(row, 1.0).max()


def test_extreme_logits_stay_finite():
    p = calibrated(np.array([1e4, -1e4] + [0.0] * 8, dtype=np.float32), 1.0)
    assert np.isfinite(p).all() and p[0] == pytest.approx(1.0)


def test_classification_shape_and_top_k():
    p = np.array([0.05, 0.6, 0.05, 0.2, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01], dtype=np.float32)
    result = classification(p)
    assert result["predicted_class"] == "automobile" and result["confidence"] == pytest.approx(0.6)
    assert list(result["all_probabilities"]) == list(CLASSES) and "top_k" not in result
    top = classification(p, top_k=2)["top_k"]
    assert [t["class"] for t in top] == ["automobile", "cat"]


def test_temperature_fit_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 3
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    overconfident = true_logits * 2.5  # a network 2.5x too sure of itself
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(2.5, rel=0.1)
    assert expected_calibration_error((overconfident / temperature).softmax(1), labels) < \
        expected_calibration_error(overconfident.softmax(1), labels)
