"""Typed results of one training run and of one data size (pure: no torch, Optuna or Ray).

A family's run function returns a :class:`RunResult`; a trial combines the runs of one size
(one per seed) into a :class:`SizeRecord`. Both cross process borders, the run cache and
Optuna's user attributes as plain JSON (``to_dict``/``from_dict``); every consumer (trial,
run cache, study attributes, console, live view, report) reads them by field.

Fields common to every family are attributes; a family's own numbers (CVFP: effective
ranks, phase-1 iterations and convergence, ...) go in ``metrics``; its parameter counts in
``params`` (always with ``"total"``); the seconds of its phases, in order, in
``phase_seconds``. ``capped`` names every training cap a run hit while it was still
improving (see :data:`CAP_FLAGS`): such a run is under-trained and a fit that rests on it
is flagged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

CAP_FLAGS = {
    "phase1_max_iterations": "phase 1 stopped at max_iterations before the converged fraction was reached",
    "max_epochs": "the best validation epoch was the last one allowed (max_epochs)",
}
"""Cap flags a run may carry, with what each means."""


@dataclass
class RunResult:
    """One run: one family config trained on one training prefix with one seed."""

    family: str
    seed: int
    train_tokens: int
    val_tokens: int
    val_loss: float
    """Mean next-token cross-entropy (nats) over the validation tokens."""
    val_loss_se: float
    """Standard error of that mean: std of the per-token losses / sqrt(val_tokens)."""
    val_ppl: float
    val_acc: float
    params: dict[str, int]
    """Named parameter counts; always has "total" (CVFP: "phase1", "phase2", "total")."""
    seconds: float
    device: str
    precision: str
    phase_seconds: dict[str, float] = field(default_factory=dict)
    capped: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        return int(self.params["total"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SizeRecord:
    """One data size of a trial: its runs (one per seed) combined.

    PPL is the geometric mean over seeds (the fit is on ln PPL), every other number the
    arithmetic mean; ``val_loss_se`` combines the per-run standard errors with the spread
    between seeds (see ``archsearch.trial.combine_seeds``)."""

    size: int
    size_unit: str
    train_tokens: int
    val_tokens: int
    val_loss: float
    val_loss_se: float
    val_ppl: float
    val_acc: float
    params: dict[str, int]
    seconds: float
    device: str
    precision: str
    seeds: list[int]
    phase_seconds: dict[str, float] = field(default_factory=dict)
    capped: list[str] = field(default_factory=list)
    """Caps hit by any of the size's runs."""
    metrics: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    val_ppl_seeds: list[float] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return int(self.params["total"])

    def ppl_interval(self, z: float = 1.96) -> tuple[float, float]:
        """PPL interval from the standard error of the mean validation loss."""
        if not math.isfinite(self.val_loss_se):
            return (math.nan, math.nan)
        return (math.exp(self.val_loss - z * self.val_loss_se), math.exp(self.val_loss + z * self.val_loss_se))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SizeRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
