"""Temperature scaling: one scalar per fold model that makes its probabilities honest.

Operating points are chosen on out-of-fold predictions, each from a single fold model, but
evaluation averages several fold models (and TTA views). A fine-tuned network is often
over-confident on images it has not seen, and each fold's model in its own way, so the same
probability means different things per fold and the pooled OOF threshold does not transfer to the
ensemble. Dividing each model's logits by a temperature fitted on its own validation fold
(Guo et al., 2017, "On Calibration of Modern Neural Networks") makes the models agree in scale
without changing any model's ranking of images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit

_EPS = 1e-7  # float32 sigmoid outputs saturate near here; keeps logits finite
LOGIT_BOUND = float(logit(1 - _EPS))  # |logit| of the clipped probabilities: the range temperatures act on


def to_logits(probs: Sequence[float]) -> np.ndarray:
    """The logits of probabilities, clipped to stay finite."""
    return logit(np.clip(np.asarray(probs, dtype=float), _EPS, 1 - _EPS))


def log_loss(labels: Sequence[int], probs: Sequence[float]) -> float:
    """Mean binary cross-entropy of probabilities (clipped like :func:`to_logits`)."""
    y = np.asarray(labels, dtype=float)
    p = np.clip(np.asarray(probs, dtype=float), _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperature(labels: Sequence[int], probs: Sequence[float], bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature ``T`` that minimises the log-loss of ``sigmoid(logit(probs) / T)``.

    Args:
        labels: true 0/1 labels.
        probs: the model's probabilities of malignancy on those images.
        bounds: the search range of ``T``; a fold with a single class returns 1.

    Returns:
        ``T`` (> 1 softens an over-confident model, < 1 sharpens an under-confident one).
    """
    y = np.asarray(labels, dtype=int)
    if len(np.unique(y)) < 2:
        return 1.0
    z = to_logits(probs)
    result = minimize_scalar(lambda log_t: log_loss(y, expit(z / np.exp(log_t))),
                             bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def apply_temperature(probs: Sequence[float], temperature: float) -> np.ndarray:
    """Probabilities rescaled by ``temperature`` (1 leaves them as they are)."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=float)
    return expit(to_logits(probs) / temperature)


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A model's logits divided by its temperature, through the same map as :func:`apply_temperature`.

    The OOF probabilities that thresholds are chosen on were clipped to ``[1e-7, 1 - 1e-7]`` before
    rescaling, so the logits are clipped to ``±LOGIT_BOUND`` here too: without it a logit of -20 at
    temperature 3 would give 0.0013 at test time where its OOF twin gave 0.0046 (1 leaves them as
    they are, as there).
    """
    if temperature == 1.0:
        return logits
    return logits.clamp(-LOGIT_BOUND, LOGIT_BOUND) / temperature
