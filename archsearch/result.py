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
        return cls(**_known_fields(cls, d))


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
    family: str = "cvfp"
    """The family of the size's runs (records written before families read as cvfp)."""
    retried: dict[str, int] = field(default_factory=dict)
    """The raised caps the size was trained again with (a space's ``capped: {retry: ...}``),
    empty when its first runs stood."""

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
        """From ``to_dict``'s form, or from the flat per-size dict of studies written before
        these types (every number at the top level, no standard error: it reads as NaN)."""
        if "params" not in d:
            d = _from_flat(d)
        return cls(**_known_fields(cls, d))


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The dataclass's fields of ``d``; a float field stored as None (JSON has no NaN: the
    trial worker sends NaN as null) reads as NaN."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v = d[f.name]
            out[f.name] = math.nan if v is None and f.type == "float" else v
    return out


_FLAT_PARAMS = {"phase1_params": "phase1", "phase2_params": "phase2", "total_params": "total"}
_FLAT_PHASES = {"phase1_seconds": "phase1", "contexts_seconds": "contexts", "er_seconds": "er", "phase2_seconds": "phase2"}
_FLAT_METRICS = ("train_er", "val_er", "phase1_iterations", "phase1_convergence_rate", "phase2_best_epoch",
                 "phase2_stopped_epoch", "phase1_tokens_per_s", "phase2_tokens_per_s", "val_step_us", "embed_dim", "vocab_size")  # fmt: skip


def _from_flat(d: dict[str, Any]) -> dict[str, Any]:
    """A CVFP per-size record of the old flat form (archsearch before RunResult) in to_dict's form."""
    out = {k: v for k, v in d.items() if k not in _FLAT_PARAMS and k not in _FLAT_PHASES and k not in _FLAT_METRICS}
    out["params"] = {name: d[k] for k, name in _FLAT_PARAMS.items() if k in d}
    out["phase_seconds"] = {name: d[k] for k, name in _FLAT_PHASES.items() if k in d}
    out["metrics"] = {k: d[k] for k in _FLAT_METRICS if k in d}
    out.setdefault("val_loss_se", math.nan)
    out.setdefault("seconds", math.nan)
    out.setdefault("val_tokens", 0)
    out.setdefault("device", "")
    out.setdefault("precision", "")
    out.setdefault("seeds", [])
    return out
