"""What a trial is scored by (pure: no torch, Optuna or Ray).

Every objective a space file may name is one :class:`ObjectiveDef` in :data:`OBJECTIVES`: its
name, its default direction, whether it needs the scaling fit across sizes, and how its value
(and, where the numbers give one, its interval) is computed from the trial's per-size
records (:class:`~archsearch.result.SizeRecord`, smallest size first) and the fit. A space's
``objective`` section is parsed here into :class:`Objective`\\ s (a definition plus what the
space chose: direction, target); the trial scores itself with them, the search tells Optuna
their values, the dashboard and the report show their labels.

A new objective is one entry of :data:`OBJECTIVES`; the default one is :func:`default_objective`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from archsearch.errors import shown

if TYPE_CHECKING:
    from archsearch.result import SizeRecord
    from archsearch.scaling import ScalingFit

DIRECTIONS = ("minimize", "maximize")


class Estimate(NamedTuple):
    """An objective's value with its interval (NaN ends where the numbers give none)."""

    value: float
    low: float = math.nan
    high: float = math.nan


Records = Sequence["SizeRecord"]
ValueFn = Callable[[Records, "ScalingFit | None", "float | None"], float]
"""value(records, fit, target_tokens): records are the sizes done so far, smallest first."""
IntervalFn = Callable[[Records, "ScalingFit | None", "float | None"], tuple[float, float]]


@dataclass(frozen=True)
class ObjectiveDef:
    """One objective archsearch knows."""

    name: str
    direction: str
    """Default direction (a space's ``direction`` or ``study.directions`` may override it)."""
    needs_fit: bool
    """Computed from the fitted law across sizes (so it needs at least two sizes)."""
    value: ValueFn
    doc: str
    interval: IntervalFn | None = None
    """(low, high) of the value, where the fit or the records provide one."""
    default_target: float | None = None
    """Objectives that take ``target_tokens`` (extrapolations): its default; None: takes none."""

    @property
    def takes_target(self) -> bool:
        return self.default_target is not None


def _last(records: Records) -> SizeRecord:
    return records[-1]


OBJECTIVES: dict[str, ObjectiveDef] = {d.name: d for d in (
    ObjectiveDef("alpha", "minimize", True, lambda rs, fit, t: fit.alpha,
                 "slope of ln PPL on ln tokens (more negative: more gain per token)",
                 interval=lambda rs, fit, t: (fit.alpha_low, fit.alpha_high)),
    ObjectiveDef("ppl_at", "minimize", True, lambda rs, fit, t: fit.extrapolate(t).ppl,
                 "PPL of the fitted law extrapolated to target_tokens",
                 interval=lambda rs, fit, t: (fit.extrapolate(t).low, fit.extrapolate(t).high),
                 default_target=10_000_000),
    ObjectiveDef("final_ppl", "minimize", False, lambda rs, fit, t: _last(rs).val_ppl,
                 "validation PPL at the largest size",
                 interval=lambda rs, fit, t: _last(rs).ppl_interval()),
    ObjectiveDef("final_acc", "maximize", False, lambda rs, fit, t: _last(rs).val_acc,
                 "validation next-token accuracy at the largest size"),
    ObjectiveDef("val_er", "maximize", False, lambda rs, fit, t: _last(rs).metrics["val_er"],
                 "effective rank of the validation contexts at the largest size (fraction of C)"),
    ObjectiveDef("phase1_params", "minimize", False, lambda rs, fit, t: float(_last(rs).params["phase1"]),
                 "parameters trained in phase 1 (the ContextBlock)"),
    ObjectiveDef("phase2_params", "minimize", False, lambda rs, fit, t: float(_last(rs).params["phase2"]),
                 "parameters trained in phase 2 (the TokenBlock)"),
    ObjectiveDef("total_params", "minimize", False, lambda rs, fit, t: float(_last(rs).params["total"]),
                 "all trained parameters"),
)}  # fmt: skip

DEFAULT_TARGET_TOKENS = OBJECTIVES["ppl_at"].default_target
MAX_TARGET_TOKENS = 1e15
"""Largest target_tokens an extrapolating objective takes."""


def default_objective(sampler: str) -> str:
    """The objective of a space file without an ``objective`` section, for its sampler
    (``grid``, ``tpe``, ...): a grid keeps alpha, the report's own measure; searches (every
    other sampler) default to the PPL extrapolated to the default target (alpha alone
    rewards models that are bad but fall steeply)."""
    return "alpha" if sampler == "grid" else "ppl_at"


@dataclass(frozen=True)
class Objective:
    """An objective as a space chose it. Plain data: it crosses process borders and is part
    of a study's signature (as :meth:`to_dict`)."""

    name: str
    direction: str
    target_tokens: float | None = None

    @property
    def definition(self) -> ObjectiveDef:
        return OBJECTIVES[self.name]

    @property
    def needs_fit(self) -> bool:
        return self.definition.needs_fit

    @property
    def label(self) -> str:
        """Name shown in the dashboard and reports (``ppl_at_10M``, ``alpha``, ...)."""
        if self.definition.takes_target:
            return f"{self.name}_{short_count(self.target_tokens)}"
        return self.name

    def value(self, records: Records, fit: ScalingFit | None) -> float | None:
        """The value from the sizes done so far; None while it cannot be computed yet (no
        size, or a fit-based objective before two sizes)."""
        if not records or (self.needs_fit and fit is None):
            return None
        return float(self.definition.value(records, fit, self.target_tokens))

    def estimate(self, records: Records, fit: ScalingFit | None) -> Estimate | None:
        """The value with its interval (NaN ends where the objective has none); None as for
        :meth:`value`."""
        value = self.value(records, fit)
        if value is None:
            return None
        if self.definition.interval is None:
            return Estimate(value)
        low, high = self.definition.interval(records, fit, self.target_tokens)
        return Estimate(value, float(low), float(high))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "direction": self.direction, "target_tokens": self.target_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Objective:
        return cls(d["name"], d["direction"], d.get("target_tokens"))


def objective_values(objectives: Sequence[Objective], records: Records, fit: ScalingFit | None) -> list[float | None]:
    """Every objective's value from the sizes done so far (None where not computable yet)."""
    return [o.value(records, fit) for o in objectives]


def short_count(n: float | None) -> str:
    """1e7 -> '10M', 2500 -> '2.5k'."""
    n = float(n or 0)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:g}{suffix}"
    return f"{n:g}"


# --------------------------------------------------------------------------- space-file syntax


def parse_objectives(raw: Any, directions: Any, problems: list[str], sampler: str = "grid") -> list[Objective]:
    """A space's ``objective`` (a name, a mapping, or a list of them for a Pareto search;
    None, i.e. not given: the sampler's default) and ``study.directions``; every problem is
    appended to ``problems``."""
    default = default_objective(sampler)
    target = OBJECTIVES[default].default_target
    fallback = [Objective(default, OBJECTIVES[default].direction, float(target) if target is not None else None)]
    if raw is None:
        raw = default
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        problems.append("objective: expected at least one objective")
        return fallback
    out = []
    for i, item in enumerate(items):
        where = "objective" if not isinstance(raw, list) else f"objective[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            problems.append(f"{where}: expected an objective name or mapping, got {shown(item)}")
            continue
        for k in item:
            if k not in ("name", "target_tokens", "direction"):
                problems.append(f"{where}.{k}: unknown key (known: name, target_tokens, direction)")
        name = item.get("name")
        if not isinstance(name, str) or name not in OBJECTIVES:
            problems.append(f"{where}: unknown objective {shown(name)} (one of {', '.join(OBJECTIVES)})")
            continue
        d = OBJECTIVES[name]
        target = item.get("target_tokens")
        if d.takes_target:
            target = d.default_target if target is None else target
            if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= MAX_TARGET_TOKENS:
                problems.append(f"{where}.target_tokens: expected a positive token count up to {MAX_TARGET_TOKENS:.0e}, got {shown(target)}")
                continue
        elif target is not None:
            takers = [n for n, o in OBJECTIVES.items() if o.takes_target]
            problems.append(f"{where}.target_tokens: only the {', '.join(takers)} objective takes a target")
        direction = item.get("direction", d.direction)
        if not isinstance(direction, str) or direction not in DIRECTIONS:
            problems.append(f"{where}.direction: expected minimize or maximize, got {shown(direction)}")
            continue
        out.append(Objective(name, direction, float(target) if d.takes_target else None))
    if directions is not None:
        if not isinstance(directions, list) or len(directions) != len(out) or any(not isinstance(d, str) or d not in DIRECTIONS for d in directions):
            problems.append(f"study.directions: expected {len(out)} of minimize/maximize (one per objective), got {shown(directions)}")
        else:
            out = [Objective(o.name, d, o.target_tokens) for o, d in zip(out, directions)]
    labels = [o.label for o in out]
    if len(set(labels)) != len(labels):
        problems.append(f"objective: the same objective twice ({labels})")
    return out or fallback
