"""OOD statistics of the likelihood profile log p_t(x), t = 0..T+1 (Theorem 3.2, one forward pass).

Each detector maps profiles (B, T+2) in nats to scores (B,), higher = more out-of-distribution (the
pytorch-ood convention), and round-trips through a plain dict so it can live inside a checkpoint.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import CdmOodError
from ..likelihood import bits_per_dim


class NotFittedError(CdmOodError, RuntimeError):
    """A detector or threshold was used before it was fitted on in-distribution data."""


class Detector:
    """Base of the profile statistics: `fit` on in-distribution profiles, then `score`."""

    name: ClassVar[str]

    def __init__(self, num_dims: int, bit_depth: int = 8) -> None:
        self.num_dims, self.bit_depth = num_dims, bit_depth

    def fit(self, profiles: Tensor) -> Detector:
        return self

    def score(self, profiles: Tensor) -> Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted detector, as plain Python data."""
        return {"name": self.name, "num_dims": self.num_dims, "bit_depth": self.bit_depth}

    @staticmethod
    def from_state(state: dict[str, Any]) -> Detector:
        """The fitted detector that `state()` describes."""
        if state.get("name") not in DETECTORS:
            raise ValueError(f"unknown detector {state.get('name')!r}; expected one of {sorted(DETECTORS)}")
        detector = DETECTORS[state["name"]](state["num_dims"], state["bit_depth"])
        detector.load(state)
        return detector

    def load(self, state: dict[str, Any]) -> None:
        """Restore what `fit` learned (nothing for a detector without parameters)."""


class NLLDetector(Detector):
    """-log p_0(x) in bits/dim (eq. 10 at t = 0): the exact negative log-likelihood of the clean-data model."""

    name = "nll"

    def score(self, profiles: Tensor) -> Tensor:
        return bits_per_dim(profiles[:, 0].double(), self.num_dims, self.bit_depth)


class MultiscaleDetector(Detector):
    """Squared Mahalanobis distance of the per-dimension profile log p_t(x) / d at `levels` noise levels
    (t = 0 and T+1 included), under a Gaussian fitted to in-distribution profiles with Ledoit-Wolf shrinkage.

    The distance is invariant to invertible linear maps of the features, so it equally models the
    likelihood ratios log p_0(x) - log p_t(x) between the clean and the noised densities. Unlike the raw
    likelihood it is two-sided (a scan that is *too* likely, e.g. a flat or over-smoothed one, is far from
    the fitted profile too) and it sees at which noise scales a scan departs from the training data.
    """

    name = "multiscale"
    levels = 16

    def __init__(self, num_dims: int, bit_depth: int = 8) -> None:
        super().__init__(num_dims, bit_depth)
        self.columns: list[int] = []
        self.mean = self.scale = self.precision = torch.empty(0)

    def _features(self, profiles: Tensor) -> Tensor:
        return profiles[:, self.columns].double().cpu() / self.num_dims

    def fit(self, profiles: Tensor) -> MultiscaleDetector:
        from sklearn.covariance import LedoitWolf

        if profiles.shape[0] < 2:
            raise ValueError(f"the multiscale detector needs at least 2 in-distribution images, got {len(profiles)}")
        self.columns = sorted({round(v) for v in np.linspace(0, profiles.shape[1] - 1, self.levels).tolist()})
        f = self._features(profiles)
        self.mean, self.scale = f.mean(0), f.std(0).clamp_min(1e-12)
        self.precision = torch.from_numpy(LedoitWolf().fit(((f - self.mean) / self.scale).numpy()).precision_)
        return self

    def score(self, profiles: Tensor) -> Tensor:
        if not self.columns:
            raise NotFittedError("the multiscale detector is not fitted: calibrate it on in-distribution data")
        z = (self._features(profiles) - self.mean) / self.scale
        return ((z @ self.precision) * z).sum(1)

    def state(self) -> dict[str, Any]:
        if not self.columns:
            raise NotFittedError("the multiscale detector is not fitted: nothing to save")
        return super().state() | {
            "columns": self.columns,
            **{k: getattr(self, k).tolist() for k in ("mean", "scale", "precision")},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.columns = [int(c) for c in state["columns"]]
        self.mean, self.scale, self.precision = (
            torch.tensor(state[k], dtype=torch.float64) for k in ("mean", "scale", "precision")
        )


DETECTORS: dict[str, type[Detector]] = {d.name: d for d in (NLLDetector, MultiscaleDetector)}
