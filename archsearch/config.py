"""Settings of one run: which model family, its fields, and CVFP's phases and engine.

CVFP (the default family) keeps its four sections: model shape (``model``), the two training
phases (``phase1``, ``phase2``) and the engine; every default is the reference value of
``docs/model.md``. Another family (``model: {family: gpt, ...}``, see
:mod:`archsearch.families`) takes all of its fields under ``model``; a mapping under ``model``
named after a family (``model: {family: cvfp, gpt: {d_model: 64}}``) holds that family's
settings for the configs or searched parameters that switch to it (``family: gpt``).
These dataclasses are pure data (no torch, no Optuna, no Ray): a space file, a search parameter
or a ``key=value`` override sets their fields by name, and :func:`run_config_from_dict` reports
every problem at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from archsearch.errors import ConfigError, bound_problem, number_text, shown


@dataclass
class ModelConfig:
    num_layers: int = 6
    """L: layers of the ContextBlock and of the TokenBlock."""
    context_dim: int = 768
    """C: width of the context vector."""
    num_input_tokens: int = 1
    """k: how many recent tokens make the token vector (width E*k)."""
    init_std: float = 0.1
    """Standard deviation of the normal init of every Linear weight."""
    init_bias_std: float = 0.01
    """Standard deviation of the normal init of every Linear bias."""
    layernorm_eps: float = 1e-5
    """Epsilon of every LayerNorm (embed_norm, context and token layers)."""


@dataclass
class Phase1Config:
    lr: float = 0.002
    """Adam learning rate of the ContextBlock."""
    noise_std: float = 0.1
    """Gaussian noise added to every input context."""
    dist_reg_weight: float = 0.8
    """w: weight of the diversity term; the fixed-point (MSE) term gets 1 - w."""
    batch_size: int = 8000
    """Consecutive positions per batch (gradients accumulate over all batches)."""
    grad_clip: float = 1.0
    """Gradient-norm clip before the single optimiser step of an iteration."""
    max_iterations: int = 40
    """Upper bound on fixed-point iterations (iteration 1 trains nothing)."""
    min_iterations: int = 5
    """No convergence stop before this iteration."""
    convergence_threshold: float = 0.03
    """A position has converged when mean((out - prev)^2) over dims is below this."""
    min_converged_fraction: float = 0.99
    """Stop once this fraction of positions has converged."""
    init_context_std: float = 0.01
    """Scale of the random contexts of iteration 1."""


@dataclass
class Phase2Config:
    lr: float = 0.001
    """Adam learning rate of the TokenBlock."""
    batch_size: int = 4096
    """Consecutive positions per step, in stream order (not shuffled)."""
    grad_clip: float = 1.0
    """Gradient-norm clip of every step."""
    max_epochs: int = 10
    """Upper bound on epochs."""
    patience: int = 1
    """Stop after this many epochs without a lower validation loss."""


PRECISIONS = ("auto", "fp32", "tf32", "bf16")
STAGE_SIZES = ("auto", True, False)
REMOVED = {
    "engine.concurrent_sizes": "was removed (a trial's sizes in threads raced on a GPU and made the command no faster); "
    "engine.stage_sizes (auto | true | false) replaces it: a trial's sizes staged, their validation passes batched",
}
"""Fields that no longer exist, with what replaced them (a config naming one is a config error)."""
RECURRENT_MODES = ("auto", "persistent", "graph", "eager", "plain")


@dataclass
class EngineConfig:
    precision: str = "auto"
    """auto (bf16 on GPUs, fp32 on CPUs) | fp32 | tf32 (TF32 matmuls) | bf16 (bf16 autocast,
    fp32 master weights, LayerNorms and losses). What is computed is the same function; only
    the arithmetic of the matrix products changes. bf16 is the GPU default because it meets
    the accuracy guard (benchmarks/h200_accuracy_guard.json: every PPL within 1% of fp32,
    alpha within 0.01) at about twice the speed."""
    er_max_rows: int = 10_000
    """Effective rank uses at most this many random rows of a context matrix."""
    phase1_chunk_batches: int = 8
    """Phase-1 batches evaluated together in one forward/backward (speed only: the loss is
    still defined per batch of ``phase1.batch_size``)."""
    eval_batch_size: int = 4096
    """Positions per evaluation step (speed and memory only)."""
    phase2_graph: bool = True
    """On GPUs, replay each full phase-2 step from a CUDA graph (speed only)."""
    fused_layers: bool = True
    """On GPUs with Triton, run each standard layer as one fused autograd Function
    (cvfp/fast/layers.py; speed only, off for A/B measurements)."""
    stage_sizes: str | bool = "auto"
    """A trial's runs (sizes and seeds) in stages (speed only: every run draws from its own
    generators, so the numbers are those of one run after another): phase 1 of every run not
    in the run cache, then their recurrent validation passes in one batched call, then each
    run's phase 2 in size order. auto (on CUDA with Triton and the persistent recurrent pass,
    with more than one run to train and no pruner; off on a CPU) | true | false. While staged
    a run holds its (N, C) contexts and (L, M-1, C) validation cache (fp32) on the device, at
    most half of the memory available then (cvfp/run.py, STAGE_MEMORY_FRACTION). CVFP only."""
    phase1_fused: bool = True
    """Phase 1's fused iteration on GPUs with Triton, for bf16 runs (cvfp/fast/phase1.py: the token half of all
    layers in one GEMM, no concatenation, the loss, its gradient and the convergence count in a
    few kernels, no autograd; standard ContextBlocks only; speed only). Where it does not apply
    (a CPU, no Triton, ``fused_layers`` off, a non-standard ContextBlock, an fp32 or tf32 run) phase 1 runs
    phases.plain_iteration whatever this says; false keeps that path on a GPU too (for A/B:
    scripts/bench_phase1.py times both). On an H200 1.5-1.7x faster per iteration than the
    fused layers' path (docs/engine.md)."""
    phase2_fused: bool = True
    """Phase 2's fused step on GPUs with Triton, for bf16 runs (cvfp/fast/phase2.py: forward,
    tied-head cross-entropy, backward, clip and Adam without autograd, the TokenBlock's parameters,
    gradients, moments and bf16 weights in flat buffers, the clip and Adam in two kernels;
    standard TokenBlocks only; speed only). Where it does not apply (a CPU, no Triton,
    ``fused_layers`` off, a non-standard TokenBlock, an fp32 or tf32 run) phase 2 takes the
    autograd step whatever this says; false keeps that step on a GPU too (for A/B:
    scripts/bench_phase2.py times both)."""
    recurrent: str = "auto"
    """How the recurrent validation pass runs (speed only): auto (persistent on GPUs with
    Triton, else eager) | persistent (one fused kernel for the whole pass) | graph (one
    fused kernel per layer and step, replayed from a CUDA graph) | eager (PyTorch ops, the
    token half batched) | plain (the ContextBlock called step by step, as any layer form is)."""


DEFAULT_FAMILY = "cvfp"


@dataclass
class RunConfig:
    """Everything that decides what one run computes, but the data, size and seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """CVFP's model fields (also when another family is active: then from ``model.cvfp``)."""
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    engine: EngineConfig = field(default_factory=EngineConfig)
    family: str = DEFAULT_FAMILY
    """The family a run trains: a built-in or entry-point name, or ``module:attr`` / ``file.py:attr``."""
    custom: Any = None
    """The active family's config dataclass when the family is not cvfp."""
    others: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Validated settings of the other (non-cvfp) families a config may switch to."""

    @property
    def family_config(self) -> Any:
        """What the active family's ``train``/``param_counts`` take: this RunConfig for cvfp."""
        return self if self.family == DEFAULT_FAMILY else self.custom

    def family_object(self) -> Any:
        from archsearch.families import get_family

        return get_family(self.family)

    def _cvfp_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data that :func:`run_config_from_dict` reads back (a CVFP config without other
        families' settings gives exactly the four sections it always had)."""
        d = self._cvfp_dict()
        if self.family != DEFAULT_FAMILY:
            cvfp_model = d["model"]
            d["model"] = {"family": self.family, **dataclasses.asdict(self.custom)}
            if cvfp_model != dataclasses.asdict(ModelConfig()):
                d["model"][DEFAULT_FAMILY] = cvfp_model
        for name, settings in self.others.items():
            d["model"][name] = dict(settings)
        return d

    def key(self) -> str:
        """Stable hash of everything that changes the computed numbers (run-cache key part).

        CVFP: its four sections, less the engine fields that only change speed (chunking,
        graphs, eval batch); another family: its name, version and config."""
        if self.family == DEFAULT_FAMILY:
            d: dict[str, Any] = self._cvfp_dict()
            d["engine"] = {"precision": self.engine.precision, "er_max_rows": self.engine.er_max_rows}
        else:
            fam = self.family_object()
            d = {"family": fam.name, "version": getattr(fam, "version", 1), "config": dataclasses.asdict(self.custom)}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """The config as a study signature sees it: ``to_dict`` with the family by its name."""
        d = self.to_dict()
        if self.family != DEFAULT_FAMILY:
            d["model"]["family"] = self.family_object().name
        return d

    def value_of(self, name: str, families: Any = ()) -> Any:
        """A field's value by canonical name: of the active family, else of the other family
        (among ``families`` and those with settings here) that has it: its setting or default."""
        if name == "family":
            return self.family
        try:
            section, key = resolve_field(name, self.family)
            return getattr(self.custom if section == "model" and self.family != DEFAULT_FAMILY else getattr(self, section), key)
        except KeyError:
            pass
        for fam in dict.fromkeys([*self.others, *families, DEFAULT_FAMILY]):
            if fam == self.family or name not in family_fields(fam):
                continue
            if fam == DEFAULT_FAMILY:
                return getattr(self.model, name)
            if name in self.others.get(fam, {}):
                return self.others[fam][name]
            from archsearch.families import get_family

            return getattr(get_family(fam).config(), name)
        raise KeyError(f"unknown field {name!r}")

    def replace(self, **dotted: Any) -> "RunConfig":
        """A copy with fields set by dotted name (``num_layers``, ``phase1.lr`` or ``family``).

        ``family`` switches the active family (its settings come from ``model.<family>``); a
        bare name that is not a field of the resulting family is another family's searched
        field and is left out (parameters of a cross-family search are conditional)."""
        target = dotted.get("family", self.family)
        d = self.to_dict()
        if target != self.family:
            d["model"] = _switch_family(d["model"], self.family, target)
        for name, value in dotted.items():
            if name == "family":
                continue
            try:
                section, key = resolve_field(name, target)
            except KeyError:
                if "." in name:
                    raise
                continue
            d[section][key] = value
        return run_config_from_dict(d)


def _switch_family(model: dict[str, Any], current: str, target: str) -> dict[str, Any]:
    fields = {k: v for k, v in model.items() if k != "family" and not isinstance(v, dict)}
    nested = {k: v for k, v in model.items() if isinstance(v, dict)}
    nested[current] = fields
    out = dict(nested.pop(target, {}))
    if target != DEFAULT_FAMILY:
        out["family"] = target
    return {**out, **{k: v for k, v in nested.items() if v or k != DEFAULT_FAMILY}}


def family_fields(family: str) -> list[str]:
    """Field names of a family's model section (raises FamilyError for an unknown family)."""
    if family == DEFAULT_FAMILY:
        return list(_field_types(ModelConfig))
    from archsearch.families import field_names, get_family

    return field_names(get_family(family).config)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "phase1": Phase1Config,
    "phase2": Phase2Config,
    "engine": EngineConfig,
}


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(cls)}


def resolve_precision(precision: str, device_type: str) -> str:
    """The arithmetic a run uses on a device: ``auto`` is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def resolve_field(name: str, family: str = DEFAULT_FAMILY) -> tuple[str, str]:
    """``num_layers`` / ``model.num_layers`` -> ("model", "num_layers"); ``phase1.lr`` -> ...

    Bare names are allowed for model fields only (they are what a search usually varies); the
    model fields are those of ``family``; ``family`` itself is ("model", "family")."""
    if name in ("family", "model.family"):
        return "model", "family"
    if "." in name:
        section, _, key = name.partition(".")
        if section == "model":
            if key not in family_fields(family):
                raise KeyError(f"unknown field {key!r} of the {family} family (fields: {', '.join(family_fields(family))})")
            return section, key
        if section not in SECTIONS:
            raise KeyError(f"unknown section {section!r} in {name!r} (one of {', '.join(SECTIONS)})")
        if name in REMOVED:
            raise KeyError(f"{name} {REMOVED[name]}")
        if key not in _field_types(SECTIONS[section]):
            raise KeyError(f"unknown field {key!r} in {section!r} (fields: {', '.join(_field_types(SECTIONS[section]))})")
        return section, key
    if name in family_fields(family):
        return "model", name
    if family != DEFAULT_FAMILY:
        raise KeyError(f"unknown field {name!r}: fields of the {family} family are {', '.join(family_fields(family))}")
    raise KeyError(
        f"unknown field {name!r}: model fields are {', '.join(_field_types(ModelConfig))}; "
        "training fields are written with their section, e.g. phase1.lr"
    )


def canonical_name(name: str, families: Any = (DEFAULT_FAMILY,)) -> str:
    """The name a searched field carries in a study: bare for model fields (of any of
    ``families``), dotted otherwise; ``family`` for the family itself."""
    families = list(families) or [DEFAULT_FAMILY]
    errors = []
    for fam in families:
        try:
            section, key = resolve_field(name, fam)
        except KeyError as e:
            errors.append(e.args[0])
            continue
        return key if section == "model" else f"{section}.{key}"
    if len(families) == 1:
        raise KeyError(errors[0])
    raise KeyError(f"{name!r} is a field of none of the families {', '.join(families)} ({'; '.join(errors)})")


def _check_type(where: str, value: Any, typ: str, problems: list[str]) -> Any:
    """Coerce ``value`` to ``typ`` (int | float | str | bool) or record a problem."""
    if typ == "bool":
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true/false, got {shown(value)}")
        return None
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            problems.append(f"{where}: expected an integer, got {shown(value)}")
            return None
        return int(value)
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {shown(value)}")
            return None
        return float(value)
    if typ == "str":
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {shown(value)}")
            return None
        return value
    raise AssertionError(typ)


# (low, low is exclusive?, high) of each numeric field: the low ends are what the model
# needs, the high ends of the sizes and counts what a real GPU can hold (an 80-141 GB device;
# see the README's "Limits (chosen)"). Checked before anything is built, so `num_layers: 1e9`
# is an error, not a list of a billion layer widths. Scales (learning rates, std devs,
# thresholds) have no upper end (None) but must be finite: a huge one is a legal, if
# diverging, experiment (the tests provoke a NaN loss with init_std 1e30).
BATCH_MAX = 2**24
_BOUNDS: dict[str, tuple[float, bool, float | None]] = {
    "model.num_layers": (1, False, 256),
    "model.context_dim": (1, False, 32_768),
    "model.num_input_tokens": (1, False, 64),
    "model.init_std": (0, False, None),
    "model.init_bias_std": (0, False, None),
    "model.layernorm_eps": (0, True, 1),
    "phase1.lr": (0, True, None),
    "phase1.noise_std": (0, False, None),
    "phase1.batch_size": (1, False, BATCH_MAX),
    "phase1.grad_clip": (0, True, None),
    "phase1.max_iterations": (1, False, 10_000),
    "phase1.min_iterations": (1, False, 10_000),
    "phase1.convergence_threshold": (0, True, None),
    "phase1.init_context_std": (0, False, None),
    "phase2.lr": (0, True, None),
    "phase2.batch_size": (1, False, BATCH_MAX),
    "phase2.grad_clip": (0, True, None),
    "phase2.max_epochs": (1, False, 10_000),
    "phase2.patience": (1, False, 10_000),
    "engine.er_max_rows": (1, False, 1_000_000),
    "engine.phase1_chunk_batches": (1, False, 1_024),
    "engine.eval_batch_size": (1, False, BATCH_MAX),
}
_SPECIAL = {"engine.stage_sizes": STAGE_SIZES}
"""Fields of one of a few values of mixed types (checked by value, not by type)."""
MAX_PARAMS = 4e9
"""Trainable parameters of one config, phase 1 + phase 2 (fp32 weights, gradients and Adam's
two moments: 16 bytes each, 64 GB at the limit)."""


def bounds_table() -> list[tuple[str, str]]:
    """(field, allowed range) rows, as the README documents them."""
    return [
        (name, f"{'(' if strict else '['}{number_text(low)}, {number_text(high)}]" if high is not None else f"{'>' if strict else '>='} {number_text(low)}, finite")
        for name, (low, strict, high) in _BOUNDS.items()
    ]


def run_config_from_dict(d: dict[str, Any] | None, where: str = "") -> RunConfig:
    """Build a RunConfig from ``{"model": {...}, "phase1": {...}, ...}`` (missing = default).

    Raises one ConfigError listing every unknown key, wrong type and out-of-range value."""
    problems: list[str] = []
    d = d or {}
    prefix = f"{where}." if where else ""
    built: dict[str, Any] = {}
    family, custom, others = DEFAULT_FAMILY, None, {}
    model_raw = d.get("model") or {}
    if isinstance(model_raw, dict) and (("family" in model_raw) or any(isinstance(v, dict) for v in model_raw.values())):
        family, custom, others, cvfp_model = _family_sections(model_raw, f"{prefix}model", problems)
        d = dict(d, model=cvfp_model)
    for section, cls in SECTIONS.items():
        raw = d.get(section) or {}
        if not isinstance(raw, dict):
            problems.append(f"{prefix}{section}: expected a mapping of fields, got {shown(raw)}")
            raw = {}
        types = _field_types(cls)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            loc = f"{prefix}{section}.{key if isinstance(key, str) and len(key) <= 40 else shown(key, 40)}"
            if f"{section}.{key}" in REMOVED:
                problems.append(f"{loc}: {REMOVED[f'{section}.{key}']}")
                continue
            if key not in types:
                problems.append(f"{loc}: unknown field (fields of {section}: {', '.join(types)})")
                continue
            if allowed := _SPECIAL.get(f"{section}.{key}"):
                if not any(value is c or (isinstance(c, str) and value == c) for c in allowed):
                    problems.append(f"{loc}: must be auto, true or false, got {shown(value)}")
                else:
                    values[key] = value
                continue
            typ = types[key]
            v = _check_type(loc, value, typ, problems)
            if v is None:
                continue
            if typ == "float" and not math.isfinite(v):
                problems.append(f"{loc}: expected a finite number, got {shown(value)}")
                continue
            bound = _BOUNDS.get(f"{section}.{key}")
            if bound is not None:
                low, strict, high = bound
                why = "the limit of a real GPU; see the README"
                if (problem := bound_problem(loc, v, low, high, strict_low=strict, why=why, given=value)) is not None:
                    problems.append(problem)
                    continue
            values[key] = v
        try:
            built[section] = cls(**values)
        except TypeError as e:  # pragma: no cover - guarded above
            problems.append(f"{prefix}{section}: {e}")
    for key in d:
        if key not in SECTIONS:
            problems.append(f"{prefix}{key}: unknown section (one of {', '.join(SECTIONS)})")
    if not problems:
        cfg = RunConfig(**built, family=family, custom=custom, others=others)
        problems.extend(_cross_checks(cfg, prefix))
        if not problems:
            return cfg
    raise ConfigError(problems)


def _family_sections(model: dict[str, Any], where: str, problems: list[str]):
    """Split ``model:`` into the active family, its config, the other families' settings and
    CVFP's model fields; every problem is added to ``problems`` with its key."""
    from archsearch.families import config_from_dict, get_family

    family = model.get("family", DEFAULT_FAMILY)
    fields = {k: v for k, v in model.items() if k != "family" and not isinstance(v, dict)}
    nested = {k: v for k, v in model.items() if isinstance(v, dict)}
    custom, others, cvfp_model = None, {}, {}
    if not isinstance(family, str):
        problems.append(f"{where}.family: expected a family name, got {family!r}")
        family = DEFAULT_FAMILY
    if family == DEFAULT_FAMILY:
        cvfp_model = fields
        if DEFAULT_FAMILY in nested:
            problems.append(f"{where}.{DEFAULT_FAMILY}: cvfp is the active family; its fields go directly under {where}")
            nested.pop(DEFAULT_FAMILY)
    else:
        cvfp_model = nested.pop(DEFAULT_FAMILY, {})
        try:
            fam = get_family(family)
            custom = config_from_dict(fam.config, fields, where)
        except ConfigError as e:
            problems.extend(e.problems)
            family = DEFAULT_FAMILY
    for name, settings in nested.items():
        try:
            fam = get_family(str(name))
            config_from_dict(fam.config, settings, f"{where}.{name}")
            others[str(name)] = dict(settings)
        except ConfigError as e:
            problems.extend(e.problems)
    return family, custom, others, cvfp_model


def _cross_checks(cfg: RunConfig, prefix: str) -> list[str]:
    problems = []
    p1, e = cfg.phase1, cfg.engine
    if not 0.0 <= p1.dist_reg_weight <= 1.0:
        problems.append(f"{prefix}phase1.dist_reg_weight: must lie in [0, 1], got {p1.dist_reg_weight}")
    if not 0.0 < p1.min_converged_fraction <= 1.0:
        problems.append(f"{prefix}phase1.min_converged_fraction: must lie in (0, 1], got {p1.min_converged_fraction}")
    if p1.min_iterations > p1.max_iterations:
        problems.append(
            f"{prefix}phase1.min_iterations: {p1.min_iterations} is above phase1.max_iterations ({p1.max_iterations})"
        )
    least = phase1_params(cfg.model, 1)
    if least > MAX_PARAMS:
        problems.append(
            f"{prefix}model: num_layers {cfg.model.num_layers} x context_dim {cfg.model.context_dim} makes at least "
            f"{least:,} phase-1 parameters (limit {MAX_PARAMS:,.0f})"
        )
    if e.recurrent not in RECURRENT_MODES:
        problems.append(f"{prefix}engine.recurrent: must be one of {', '.join(RECURRENT_MODES)}, got {shown(e.recurrent)}")
    if e.precision not in PRECISIONS:
        problems.append(f"{prefix}engine.precision: must be one of {', '.join(PRECISIONS)}, got {shown(e.precision)}")
    return problems


# --------------------------------------------------------------------------- parameter counts


def token_widths(embed_dim: int, num_input_tokens: int, num_layers: int) -> list[int]:
    """d_i = E*k - ((E*k - E) * i) // L for i = 0..L: the TokenBlock's widths, shrinking to E."""
    ek = embed_dim * num_input_tokens
    return [ek - ((ek - embed_dim) * i) // num_layers for i in range(num_layers + 1)]


def phase1_params(model: ModelConfig, embed_dim: int) -> int:
    """Trainable parameters of the ContextBlock (the report's "Phase1 Params")."""
    c, ek = model.context_dim, embed_dim * model.num_input_tokens
    return model.num_layers * ((c + ek) * c + c + 2 * c)


def phase2_params(model: ModelConfig, embed_dim: int) -> int:
    """Trainable parameters of the TokenBlock (the tied head is frozen and not counted)."""
    c = model.context_dim
    widths = token_widths(embed_dim, model.num_input_tokens, model.num_layers)
    total = 0
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        total += (c + d_in) * d_out + d_out  # delta Linear
        if d_in != d_out:
            total += d_in * d_out + d_out  # residual projection
        total += 2 * d_out  # LayerNorm
    return total


def param_counts(model: ModelConfig, embed_dim: int) -> dict[str, int]:
    p1, p2 = phase1_params(model, embed_dim), phase2_params(model, embed_dim)
    return {"phase1_params": p1, "phase2_params": p2, "total_params": p1 + p2}


def run_param_counts(cfg: RunConfig, embed_dim: int, vocab_size: int = 0) -> dict[str, int]:
    """Trainable parameter counts of any family's run, as ``<part>_params`` (always
    ``total_params``; CVFP: ``phase1_params``, ``phase2_params``), from the config alone."""
    if cfg.family == DEFAULT_FAMILY:
        return param_counts(cfg.model, embed_dim)
    from archsearch.families import FamilyError

    try:
        counts = cfg.family_object().param_counts(cfg.custom, embed_dim, vocab_size)
    except Exception as e:
        raise FamilyError(f"model.family: {cfg.family!r}: param_counts raised {type(e).__name__}: {e}") from None
    if not isinstance(counts, dict) or "total" not in counts or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in counts.values()):
        raise FamilyError(f"model.family: {cfg.family!r}: param_counts must return a dict of integer counts with 'total', got {counts!r}")
    return {f"{k}_params": int(v) for k, v in counts.items()}
