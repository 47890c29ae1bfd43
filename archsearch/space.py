"""Space files: what to search, on which data, how to score it (pure: no Optuna, no Ray).

A space file is YAML. Every section is optional but ``data``; see ``spaces/*.yaml`` for
commented examples and the README for the reference of every key. Parsing gathers every
problem of a file (unknown keys, wrong types, out-of-range values, ...) and raises one
:class:`~archsearch.errors.ConfigError` naming each key. Optuna distributions are built from
the pure specs here by :mod:`archsearch.search.distributions`; objectives are parsed and
computed by :mod:`archsearch.objectives`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from archsearch.config import MAX_PARAMS, RunConfig, canonical_name, resolve_field, run_config_from_dict, run_param_counts
from archsearch.errors import ConfigError, bound_problem, shown
from archsearch.objectives import DEFAULT_TARGET_TOKENS, MAX_TARGET_TOKENS, Objective, parse_objectives  # noqa: F401 (re-exported)
from archsearch.paths import name_problem

CVFP_ONLY_OBJECTIVES = ("val_er", "phase1_params", "phase2_params")
"""Objectives only the cvfp family reports."""
SAMPLERS = ("grid", "tpe", "random", "cmaes", "nsga2")
PRUNERS = ("none", "median", "percentile", "threshold", "successive_halving", "hyperband")
TOP_LEVEL = (
    "study", "objective", "sampler", "parameters", "warm_start", "n_trials", "model", "phase1", "phase2",
    "engine", "data", "seeds", "resources", "max_concurrent", "early_stopping", "constraints", "max_failures",
    "tracking", "admissible", "capped",
)  # fmt: skip
MAX_GRID = 10_000
"""Points of a Cartesian grid (counted before the grid is built)."""
MAX_SEED = 2**32 - 1
MAX_SEEDS = 100
MAX_TRIALS = 100_000
MAX_CONCURRENT = 10_000
MAX_FAILURES = 1_000
MAX_GPUS = 1_024
MAX_CPUS = 4_096
MAX_MEMORY_GB = 65_536
MAX_YAML_BYTES = 128 * 1024
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 50_000
"""Values of a YAML document after aliases are expanded (an alias bomb stops here)."""
CAPPED_RULES = ("flag", "infeasible", "retry")
"""What a space does with a trial whose runs hit a training cap: flag it (default), make it
infeasible (an Optuna constraint the sampler learns), or train the capped size again with
raised caps (``capped: {retry: {phase1.max_iterations: 80, phase2.max_epochs: 20}}``)."""
RETRY_KEYS = ("phase1.max_iterations", "phase2.max_epochs")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Distribution:
    """Optuna's distribution short form: int / float (low, high, step, log) or categorical."""

    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()

    def grid_values(self) -> list:
        """Every value of a finite distribution (for Cartesian grids)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.type == "float" and self.step:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        raise ValueError("a continuous float has no grid")

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.step:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-9
        return self.type == "float" or float(value).is_integer()

    def to_dict(self) -> dict:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        d = {"type": self.type, "low": self.low, "high": self.high}
        if self.step is not None:
            d["step"] = self.step
        if self.log:
            d["log"] = True
        return d


@dataclass
class Space:
    """A parsed, validated space file."""

    path: str
    raw: dict[str, Any]
    study_name: str
    storage: str | None
    objectives: list[Objective]
    sampler: str
    sampler_options: dict[str, Any]
    configs: dict[str, dict[str, Any]]
    """Named configs to evaluate first (grid points, or a search's warm start), canonical keys."""
    parameters: dict[str, Distribution]
    n_trials: int
    base: RunConfig
    data: Any  # archsearch.data.DataSpec
    seeds: list[int]
    gpus: float | None
    """GPUs per trial (fractions share a GPU); None = auto: 0 where the cluster has no GPU, else
    1, or 1/k where the GPUs are fewer than the trials at once (archsearch.resources)."""
    cpus: float
    max_concurrent: int
    early_stopping: dict[str, Any]
    constraints: dict[str, float]
    max_failures: int
    notes: list[str] = field(default_factory=list)
    """What the command-line overrides did beyond setting their key (see apply_run_overrides)."""
    memory_gb: float | None = None
    """Memory a trial may allocate (GB, RLIMIT_DATA in its worker; Ray schedules by it); None = no limit."""
    merged: dict[str, str] = field(default_factory=dict)
    """Configs that the overrides made identical to an earlier one: dropped name -> kept name."""
    tracking: Any = None
    """archsearch.tracking.TrackingSpec: the experiment trackers a run copies its trials to."""
    admissible: dict[str, float] = field(default_factory=dict)
    """Rules on finished trials: ``max_ppl_ratio`` (a config whose PPL at the largest size is
    worse than the best so far by more than this factor is infeasible)."""
    capped: str = "flag"
    """flag | infeasible | retry: trials whose runs hit a training cap (CAPPED_RULES)."""
    capped_retry: dict[str, int] = field(default_factory=dict)
    """With ``capped: {retry: {...}}``: the raised caps a capped size is trained again with."""

    @property
    def has_trial_constraints(self) -> bool:
        """Whether finished trials carry Optuna constraint values (``constraint_values``)."""
        return bool(self.admissible) or self.capped == "infeasible"

    @property
    def n_trial_constraints(self) -> int:
        return len(self.admissible) + (self.capped == "infeasible")

    @property
    def families(self) -> list[str]:
        """Every family a trial of this space may train: the base's, those named by configs
        and by a searched ``family`` parameter, and those with settings under ``model``."""
        return _families_in_play(self.base, self.parameters.get("family"), self.configs.values())

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def is_grid(self) -> bool:
        return self.sampler == "grid"

    @property
    def searched_fields(self) -> list[str]:
        """Canonical names of the fields a trial's params hold."""
        names = list(self.parameters)
        for cfg in self.configs.values():
            names += [k for k in cfg if k not in names]
        return names

    def run_config(self, params: dict[str, Any]) -> RunConfig:
        return self.base.replace(**params) if params else self.base

    def constraint_violations(self, params: dict[str, Any], embed_dim: int | None, vocab_size: int = 0) -> list[str]:
        """Problems of ``params`` with the space's constraints and the parameter limit a GPU
        can hold (param counts need E; V too for a family that trains its embedding)."""
        if embed_dim is None:
            return []
        counts = run_param_counts(self.run_config(params), embed_dim, vocab_size)
        out = []
        if counts["total_params"] > MAX_PARAMS:
            out.append(f"total_params = {counts['total_params']:,} exceeds the limit of {MAX_PARAMS:,.0f} a GPU can train")
        for key, limit in self.constraints.items():
            if key.removeprefix("max_") not in counts:
                continue  # e.g. max_phase1_params bounds CVFP's phase 1; another family has none
            count = counts[key.removeprefix("max_")]
            if count > limit:
                out.append(f"{key.removeprefix('max_')} = {count:,} exceeds {key} = {limit:,.0f}")
        return out


# --------------------------------------------------------------------------- YAML + overrides


class YAMLLimit(yaml.MarkedYAMLError):
    """A YAML document beyond the size, nesting or alias-expansion limits."""


class _SafeLoader(yaml.SafeLoader):
    """safe_load, plus a clear error for duplicate keys (a common, silent YAML mistake) and
    limits on nesting and on the values aliases expand to (checked while composing, before
    anything is built: an alias bomb is refused at its first alias past the limit)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent, index):
        event = self.peek_event()
        if self.check_event(yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                self._count(self._expanded(target), event)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise YAMLLimit(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
        try:
            self._count(1, event)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _count(self, n: int, event) -> None:
        self._nodes += n
        if self._nodes > MAX_YAML_NODES:
            raise YAMLLimit(None, None, f"more than {MAX_YAML_NODES:,} values once aliases (*name) are expanded", event.start_mark)

    def _expanded(self, node) -> int:
        """Values ``node`` stands for, aliases expanded (memoised: linear in the document)."""
        key = id(node)
        if key in self._sizes:
            if self._sizes[key] < 0:  # an alias inside its own anchor
                raise YAMLLimit(None, None, "an alias refers to its own anchor (a cycle)", node.start_mark)
            return self._sizes[key]
        self._sizes[key] = -1
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(self._expanded(c) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(self._expanded(k) + self._expanded(v) for k, v in node.value)
        self._sizes[key] = n = min(n, MAX_YAML_NODES + 1)
        return n


def _no_duplicates(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            raise yaml.constructor.ConstructorError(None, None, f"a key must be a name or a number, got a {kind}", key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {shown(key)}", key_node.start_mark)
        keys.add(key)
    return loader.construct_mapping(node, deep)


_LOADERS = [_SafeLoader]
if getattr(yaml, "__with_libyaml__", False):

    class _CSafeLoader(yaml.CSafeLoader):
        """The same loader on libyaml's parser (10x faster: a 256 KiB document reads in well
        under a second); its nodes are checked against the limits before they are built."""

    _LOADERS.append(_CSafeLoader)
else:  # pragma: no cover - PyYAML built without libyaml
    _CSafeLoader = None

for _loader in _LOADERS:
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
    # YAML 1.1 reads 1e-3 (no dot) as a string; read it as the number everyone means.
    _loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )


def _check_nodes(root) -> None:
    """Depth and alias-expanded size of a composed document, without recursion (libyaml's
    composer has no hooks; its own nesting limit keeps the graph shallow enough to build)."""
    sizes: dict[int, int] = {}
    stack = [(root, 1, False)]
    on_path: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = node.value if isinstance(node, yaml.SequenceNode) else [x for kv in node.value for x in kv]
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
            if sizes[key] > MAX_YAML_NODES:
                raise YAMLLimit(None, None, f"more than {MAX_YAML_NODES:,} values once aliases (*name) are expanded", node.start_mark)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YAMLLimit(None, None, "an alias refers to its own anchor (a cycle)", node.start_mark)
        if depth > MAX_YAML_DEPTH:
            raise YAMLLimit(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        on_path.add(key)
        stack.append((node, depth, True))
        children = node.value if isinstance(node, yaml.SequenceNode) else [x for kv in node.value for x in kv]
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def _load(text: str) -> Any:
    """One YAML document with the safe loader and the limits above."""
    if _CSafeLoader is None:  # pragma: no cover
        return yaml.load(text, Loader=_SafeLoader)
    loader = _CSafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_value(text: str) -> Any:
    """One YAML scalar/flow value, as in a space file (the same limits)."""
    if len(text.encode(errors="replace")) > MAX_YAML_BYTES:
        raise YAMLLimit(None, None, f"longer than {MAX_YAML_BYTES // 1024} KiB", None)
    return _load(text)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a space file with a safe loader (no object construction from tags)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"no such space file: {p}") from None
    except OSError as e:
        raise ConfigError(f"cannot read space file {p}: {e.strerror}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"a space file is at most {MAX_YAML_BYTES // 1024} KiB; this one is larger", str(p))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start}: {e.reason}); save the space file as UTF-8", str(p)) from None
    try:
        doc = _load(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_problem(e), str(p)) from None
    except RecursionError:  # pragma: no cover - the depth limit stops it first
        raise ConfigError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels", str(p)) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"a space file must be a mapping of sections, got {type(doc).__name__}", str(p))
    return doc


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = str(getattr(e, "problem", None) or e)
    problem = problem if len(problem) <= 200 else problem[:180] + "..."
    too_deep = "maximum nesting depth" in problem  # libyaml's own limit (1,000 levels of flow nesting)
    head = "YAML document too large" if isinstance(e, YAMLLimit) or too_deep else "YAML syntax error"
    return f"{head}{where}: {problem}"


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``a.b.c=value`` strings set nested keys of a copy of ``raw`` (values parsed as YAML)."""
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {shown(item)}: expected dotted.key=value")
            continue
        try:
            parsed = parse_value(value) if value.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"override {shown(item)}: value is not valid YAML ({_yaml_problem(e)})")
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                if part in node and node[part] is not None:
                    problems.append(f"override {shown(item)}: {shown(part)} is not a mapping")
                    break
                node[part] = {}
            node = node[part]
        else:
            node[parts[-1]] = parsed
    if problems:
        raise ConfigError(problems)
    return out


RUN_SECTIONS = ("model", "phase1", "phase2", "engine")
"""Sections of the run settings: an override of one of their fields applies to every trial."""


def apply_run_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """Give every trial the value of each run-field override (``model.num_layers=3``,
    ``phase1.lr=1e-3``): apply_overrides set it in the base section; here it also replaces
    the value of every named config (grid or warm start) that sets the field, and fixes a
    searched field (its entry leaves ``parameters``). Configs made identical run once (the
    later names are dropped). Returns the new raw space, one note per effect (so that an
    override a config would otherwise shadow is never silently ignored) and the dropped
    config names with the name each now runs as.

    Keys that are not fields are left for parse_space to report."""
    out = copy.deepcopy(raw)
    notes: list[str] = []
    merged: dict[str, str] = {}
    for item in overrides:
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if parts[0] not in RUN_SECTIONS or len(parts) > 2:
            continue
        if len(parts) == 1:  # model={num_layers: 3, ...}: each field of the mapping
            section = out.get(parts[0])
            fields = {f"{parts[0]}.{k}": v for k, v in section.items()} if isinstance(section, dict) else {}
        else:
            fields = {key.strip(): _section_value(out, parts)}
        for dotted, value in fields.items():
            try:
                canon = canonical_name(dotted)
            except KeyError:
                continue  # an unknown field: parse_space names it
            notes += _override_field(out, f"{dotted}={_shown(value)}", canon, value, merged)
    return out, notes, merged


def _section_value(raw: dict[str, Any], parts: list[str]) -> Any:
    section = raw.get(parts[0])
    return section.get(parts[1]) if isinstance(section, dict) else None


def _shown(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("\n...").strip()


def _canon_or_none(name: Any) -> str | None:
    try:
        return canonical_name(str(name))
    except KeyError:
        return None


def _override_field(raw: dict[str, Any], shown: str, canon: str, value: Any, merged: dict[str, str]) -> list[str]:
    notes = []
    params = raw.get("parameters")
    searched = []
    if isinstance(params, dict):
        searched = [k for k in params if _canon_or_none(k) == canon]
        for k in searched:
            del params[k]
        if searched:
            notes.append(f"{shown}: fixes {canon} for every trial (parameters.{searched[0]} no longer searches it)")
    sampler = raw.get("sampler")
    for where, holder in (("sampler.configs", sampler if isinstance(sampler, dict) else None),
                          ("warm_start.configs", raw.get("warm_start") if isinstance(raw.get("warm_start"), dict) else None)):  # fmt: skip
        if holder is None or not isinstance(holder.get("configs"), (dict, list)):
            continue
        configs = holder["configs"]
        named = configs if isinstance(configs, dict) else {
            c.get("name"): c for c in configs if isinstance(c, dict) and "name" in c}  # fmt: skip
        replaced = []
        for name, fields in named.items():
            if not isinstance(fields, dict):
                continue
            keys = [k for k in fields if k != "name" and _canon_or_none(k) == canon]
            for k in keys:
                if fields[k] != value:
                    replaced.append(f"{name} ({_shown(fields[k])})")
                if searched:  # a config holds searched fields only: the base has the value now
                    del fields[k]
                else:
                    fields[k] = value
        if replaced:
            notes.append(f"{shown}: replaces the value of {where} " + ", ".join(replaced))
        notes += _drop_duplicates(holder, where, shown, merged)
    return notes


def _drop_duplicates(holder: dict[str, Any], where: str, shown: str, merged: dict[str, str]) -> list[str]:
    """Configs that the override made identical: the first name is kept."""
    configs = holder["configs"]
    items = list(configs.items()) if isinstance(configs, dict) else [(c.get("name"), c) for c in configs if isinstance(c, dict)]
    seen: dict[str, Any] = {}
    dropped = []
    for name, fields in items:
        if not isinstance(fields, dict):
            continue
        canon = {_canon_or_none(k) or k: v for k, v in fields.items() if k != "name"}
        ident = repr(sorted(canon.items(), key=lambda kv: kv[0]))
        if ident in seen:
            dropped.append((name, seen[ident]))
        else:
            seen[ident] = name
    if not dropped:
        return []
    gone = {name for name, _ in dropped}
    for name, first in dropped:
        merged[str(name)] = merged.get(str(first), str(first))
        for old, kept in merged.items():  # an earlier override's merge into a name dropped now
            if kept == name:
                merged[old] = merged[str(name)]
    if isinstance(configs, dict):
        holder["configs"] = {k: v for k, v in configs.items() if k not in gone}
    else:
        holder["configs"] = [c for c in configs if not (isinstance(c, dict) and c.get("name") in gone)]
    return [f"{shown}: {where}.{name} is now the same as {first}; it runs once, as {first}" for name, first in dropped]


def _added_config_notes(raw: dict[str, Any], overrides: Iterable[str]) -> list[str]:
    """A note for each override that names a config the space file does not have
    (``sampler.configs.baselin.num_layers=3``): it adds that config, with the base values for
    everything it does not set, which a misspelt name would otherwise do silently."""
    notes: list[str] = []
    seen: set[str] = set()
    for item in overrides:
        parts = item.partition("=")[0].strip().split(".")
        if len(parts) < 3 or (parts[0], parts[1]) not in (("sampler", "configs"), ("warm_start", "configs")):
            continue
        section = raw.get(parts[0])
        named = section.get("configs") if isinstance(section, dict) else None
        where = f"{parts[0]}.configs"
        if not isinstance(named, dict) or not named or parts[2] in named or f"{where}.{parts[2]}" in seen:
            continue
        seen.add(f"{where}.{parts[2]}")
        known = ", ".join(str(k) for k in list(named)[:20]) + (", ..." if len(named) > 20 else "")
        notes.append(f"{'.'.join(parts)[:120]}: adds the config {parts[2][:80]} to {where} (the space file names {known}); "
                     "its other fields keep the base values")  # fmt: skip
    return notes


# --------------------------------------------------------------------------- parsing


def load_space(path: str | Path, overrides: Iterable[str] = ()) -> Space:
    """Read, override and validate a space file."""
    return override_space(load_yaml(path), overrides, str(path))


def override_space(raw: dict[str, Any], overrides: Iterable[str] = (), path: str = "<space>") -> Space:
    """Override and validate a space dict as the commands do (a file's, a mapping of the
    Python API): the overrides applied, a run field's to every config, each effect a note."""
    overrides = list(overrides)
    try:
        added = _added_config_notes(raw, overrides)
        raw = apply_overrides(raw, overrides)
        raw, notes, merged = apply_run_overrides(raw, overrides)
        space = parse_space(raw, path)
    except ConfigError as e:
        raise e.with_source(path) from None
    space.notes, space.merged = added + notes, merged
    return space


def parse_space(raw: dict[str, Any], path: str = "<space>") -> Space:
    """Validate a space dict; one ConfigError lists every problem."""
    from archsearch.data import data_spec_from_dict  # data imports nothing heavy at module level

    problems: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(f"{key}: unknown section (known: {', '.join(TOP_LEVEL)})")

    study = _mapping(raw, "study", problems)
    _unknown(study, "study", ("name", "storage", "directions"), problems)
    default_name = Path(path).stem if path and not path.startswith("<") else "archsearch"
    study_name = study.get("name", default_name)
    why = name_problem(study_name)
    if why:
        problems.append(f"study.name: {why}, got {shown(study_name)}")
    storage = study.get("storage")
    if storage is not None and not isinstance(storage, str):
        problems.append(f"study.storage: expected a storage URL string, got a {type(storage).__name__}")

    declared = raw.get("sampler", "grid")  # the default objective may depend on the sampler
    sampler_type = declared.get("type", "grid") if isinstance(declared, dict) else declared
    objectives = parse_objectives(raw.get("objective"), study.get("directions"), problems, str(sampler_type))

    # base run config: model / phase1 / phase2 / engine
    base = RunConfig()
    try:
        base = run_config_from_dict({k: raw[k] for k in ("model", "phase1", "phase2", "engine") if k in raw})
    except ConfigError as e:
        problems += e.problems
        family = raw.get("model", {}).get("family") if isinstance(raw.get("model"), dict) else None
        try:  # the configs are still checked against the family the space names
            base = run_config_from_dict({"model": {"family": family}}) if isinstance(family, str) else base
        except ConfigError:
            pass

    sampler_raw = raw.get("sampler", "grid")
    if isinstance(sampler_raw, str):
        sampler_raw = {"type": sampler_raw}
    if not isinstance(sampler_raw, dict):
        problems.append(f"sampler: expected a sampler name or a mapping, got {shown(sampler_raw)}")
        sampler_raw = {"type": "grid"}
    sampler = sampler_raw.get("type", "grid")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        problems.append(f"sampler.type: unknown sampler {shown(sampler)} (one of {', '.join(SAMPLERS)})")
        sampler = sampler if isinstance(sampler, str) else shown(sampler)
    options = {k: v for k, v in sampler_raw.items() if k not in ("type", "configs")}

    families = _raw_families(base, raw, sampler_raw, problems)
    parameters = _parameters(raw.get("parameters"), problems, families)
    configs = _configs(sampler_raw.get("configs"), "sampler.configs", base, problems, families)
    warm = _mapping(raw, "warm_start", problems)
    _unknown(warm, "warm_start", ("configs",), problems)
    warm_configs = _configs(warm.get("configs"), "warm_start.configs", base, problems, families)
    if sampler == "grid":
        if warm_configs:
            problems.append("warm_start: a grid evaluates its configs already; warm_start is for search samplers")
        if configs and parameters:
            problems.append("sampler.configs and parameters: a grid takes either named configs or a Cartesian product of parameters, not both")
        elif not configs and parameters:
            configs = _cartesian(parameters, base, problems)
            parameters = {}
        elif not configs and not parameters:
            configs = {"base": {}}
        if options:
            problems.append(f"sampler: the grid sampler takes no options (got {', '.join(options)})")
    else:
        if configs:
            problems.append(f"sampler.configs: named configs belong to the grid sampler; for {sampler}, put them under warm_start.configs")
        if not parameters:
            problems.append(f"parameters: the {sampler} sampler needs at least one parameter to search")
        configs = warm_configs
        for name, cfg in configs.items():
            extra = [k for k in cfg if k not in parameters]
            if extra:
                problems.append(f"warm_start.configs.{name}: {', '.join(extra)} not among the searched parameters")
            for k, v in cfg.items():
                if k in parameters and not parameters[k].contains(v):
                    problems.append(f"warm_start.configs.{name}.{k}: {shown(v)} is outside parameters.{k} {parameters[k].to_dict()}")
        if sampler == "cmaes" and len(objectives) > 1:
            problems.append("sampler.type: cmaes optimises one objective; use nsga2 or tpe for several")
        _sampler_options(sampler, options, problems)

    n_trials = raw.get("n_trials", 0 if sampler == "grid" else 20)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or not 0 <= n_trials <= MAX_TRIALS:
        problems.append(f"n_trials: expected an integer 0 to {MAX_TRIALS:,}, got {shown(n_trials)}")
        n_trials = 0

    data = None
    try:
        data = data_spec_from_dict(raw.get("data"), "data")
    except ConfigError as e:
        problems += e.problems
    if data is not None:
        fitted = [o.name for o in objectives if o.needs_fit]
        if not data.sizes:  # nothing to train: the one section a space file needs
            what = "data.sizes" if isinstance(raw.get("data"), dict) else "data"
            problems.append(f"{what}: missing or empty; a space file needs at least data: {{source: wiki, sizes: {{tokens: [1000, 2000, 4000]}}}} "
                            "(the training sizes, in tokens or samples)")  # fmt: skip
        elif fitted and len(data.sizes) < 2:
            problems.append(f"data.sizes: objective {fitted[0]!r} fits a law across sizes and needs at least two, got {len(data.sizes)}")

    seeds = raw.get("seeds", [42])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds or len(seeds) > MAX_SEEDS
            or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in seeds)):  # fmt: skip
        problems.append(f"seeds: expected a non-empty list of integers 0 to 2^32-1 (at most {MAX_SEEDS}), got {shown(seeds)}")
        seeds = [42]
    elif len(set(seeds)) != len(seeds):
        problems.append(f"seeds: duplicate seeds in {shown(seeds)}")

    res = _mapping(raw, "resources", problems)
    _unknown(res, "resources", ("gpus", "cpus", "memory_gb"), problems)
    gpus: float | None = None  # "auto": resolved against the cluster by the run (archsearch.resources)
    if res.get("gpus", "auto") != "auto":
        gpus = _number(res, "gpus", 0.0, "resources", problems, low=0.0, high=MAX_GPUS)
        if gpus > 1 and not float(gpus).is_integer():
            problems.append(f"resources.gpus: above 1 a trial takes whole GPUs, got {gpus}")
    cpus = _number(res, "cpus", 1.0, "resources", problems, low=0.0, strict=True, high=MAX_CPUS)
    memory_gb = None if res.get("memory_gb") is None else _number(res, "memory_gb", 1.0, "resources", problems, low=0.0, strict=True, high=MAX_MEMORY_GB)
    max_concurrent = raw.get("max_concurrent", 1)
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or not 1 <= max_concurrent <= MAX_CONCURRENT:
        problems.append(f"max_concurrent: expected an integer 1 to {MAX_CONCURRENT:,}, got {shown(max_concurrent)}")
        max_concurrent = 1
    max_failures = raw.get("max_failures", 0)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or not 0 <= max_failures <= MAX_FAILURES:
        problems.append(f"max_failures: expected an integer 0 to {MAX_FAILURES:,}, got {shown(max_failures)}")
        max_failures = 0

    early = _early_stopping(raw.get("early_stopping"), objectives, problems)
    constraints = _constraints(raw.get("constraints"), problems)
    other = [f for f in _families_in_play(base, parameters.get("family"), [*configs.values()]) if f != "cvfp"]
    for o in objectives:
        if other and o.name in CVFP_ONLY_OBJECTIVES:
            problems.append(f"objective: {o.name} is a CVFP number, which this space's {', '.join(other)} "
                            f"{'families do' if len(other) > 1 else 'family does'} not report (use alpha, ppl_at, final_ppl, final_acc or total_params)")
    admissible = _admissible(raw.get("admissible"), problems)
    capped, capped_retry = _capped(raw.get("capped", "flag"), base, problems)
    if (admissible or capped == "infeasible") and sampler in ("grid", "cmaes"):
        problems.append(f"{'admissible' if admissible else 'capped'}: the {sampler} sampler cannot learn constraints; they are for tpe, nsga2 and random")

    from archsearch.tracking import parse_tracking  # pure: imports no tracker

    tracking = parse_tracking(raw.get("tracking"), problems)

    if problems:
        raise ConfigError(problems)
    space = Space(
        path=path, raw=raw, study_name=study_name, storage=storage, objectives=objectives, sampler=sampler,
        sampler_options=options, configs=configs, parameters=parameters, n_trials=n_trials, base=base, data=data,
        seeds=seeds, gpus=gpus, cpus=cpus, max_concurrent=max_concurrent, early_stopping=early,
        constraints=constraints, max_failures=max_failures, tracking=tracking, admissible=admissible, capped=capped,
        capped_retry=capped_retry, memory_gb=memory_gb,
    )  # fmt: skip
    e = known_embed_dim(data)
    bad = [f"{where}.{name}: {'; '.join(v)}" for where, name, v in (
        ("sampler.configs" if space.is_grid else "warm_start.configs", n, space.constraint_violations(c, e))
        for n, c in configs.items()) if v]  # fmt: skip
    bad += [f"model: {v}" for v in space.constraint_violations({}, e) if "the limit" in v and not configs]
    if bad:
        raise ConfigError([f"{b} (constraints)" for b in bad])
    return space


def known_vocab_size(data) -> int | None:
    """V of the embedding source when it is known without reading any file."""
    from archsearch.data.known import known_embedding_shape

    shape = known_embedding_shape(data) if data is not None else None
    return shape[0] if shape else None


def known_embed_dim(data) -> int | None:
    """E of the embedding source when it is known without reading any file."""
    from archsearch.data.known import known_embedding_shape

    shape = known_embedding_shape(data) if data is not None else None
    return shape[1] if shape else None


# --------------------------------------------------------------------------- section helpers


def _mapping(raw: dict, key: str, problems: list[str]) -> dict:
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        problems.append(f"{key}: expected a mapping, got {shown(v)}")
        return {}
    return v


def _unknown(d: dict, where: str, known: Iterable[str], problems: list[str]) -> None:
    known = tuple(known)
    for k in d:
        if k not in known:
            problems.append(f"{where}.{k}: unknown key (known: {', '.join(known)})")


def _number(d, key, default, where, problems, low=None, strict=False, high=None):
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        problems.append(f"{where}.{key}: expected a finite number, got {shown(v)}")
        return default
    if (problem := bound_problem(f"{where}.{key}", v, low, high, strict_low=strict)) is not None:
        problems.append(problem)
        return default
    return float(v)


def parse_distribution(spec: Any, where: str, problems: list[str]) -> Distribution | None:
    """Optuna's short form. A plain list is a categorical."""
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected a distribution like {{type: int, low: 1, high: 12}}, got {shown(spec)}")
        return None
    t = spec.get("type")
    if t == "categorical":
        _unknown(spec, where, ("type", "choices"), problems)
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or len(choices) > MAX_GRID:
            problems.append(f"{where}.choices: expected a non-empty list of at most {MAX_GRID:,} values, got {shown(choices)}")
            return None
        if any(not isinstance(c, (int, float, str, bool)) or c is None for c in choices):
            problems.append(f"{where}.choices: values must be numbers, strings or booleans")
            return None
        if len(set(map(repr, choices))) != len(choices):
            problems.append(f"{where}.choices: duplicate choices in {shown(choices)}")
            return None
        return Distribution("categorical", choices=tuple(choices))
    if not isinstance(t, str) or t not in ("int", "float"):
        problems.append(f"{where}.type: expected int, float or categorical, got {shown(t)}")
        return None
    _unknown(spec, where, ("type", "low", "high", "step", "log"), problems)
    n = len(problems)
    vals = {}
    for key in ("low", "high", "step"):
        v = spec.get(key)
        if v is None and key == "step":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append(f"{where}.{key}: expected a finite number, got {shown(v)}")
            continue
        if t == "int" and not float(v).is_integer():
            problems.append(f"{where}.{key}: an int distribution needs integers, got {shown(v)}")
            continue
        vals[key] = v
    log = spec.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{where}.log: expected true/false, got {shown(log)}")
    if len(problems) > n:
        return None
    low, high, step = vals["low"], vals["high"], vals.get("step")
    if low > high:
        problems.append(f"{where}: low ({low}) is above high ({high})")
    if step is not None and step <= 0:
        problems.append(f"{where}.step: must be > 0, got {step}")
    if log and low <= 0:
        problems.append(f"{where}: a log distribution needs low > 0, got {low}")
    if log and step is not None and not (t == "int" and step == 1):
        problems.append(f"{where}: log and step cannot be combined")
    if len(problems) > n:
        return None
    if t == "int":
        return Distribution("int", int(low), int(high), int(step) if step is not None else None, log)
    return Distribution("float", float(low), float(high), float(step) if step is not None else None, log)


def _families_in_play(base: RunConfig, family_dist: Distribution | None, configs: Iterable[dict]) -> list[str]:
    names = [base.family, *base.others]
    if family_dist is not None:
        names += [str(c) for c in family_dist.choices]
    names += [str(c["family"]) for c in configs if "family" in c]
    return list(dict.fromkeys(names))


def _raw_families(base: RunConfig, raw: dict, sampler_raw: dict, problems: list[str]) -> list[str]:
    """The families a space names (before its sections are parsed), each checked to exist."""
    from archsearch.families import FamilyError, get_family

    names = [base.family, *base.others]
    params = raw.get("parameters")
    if isinstance(params, dict) and "family" in params:
        spec = params["family"]
        choices = spec if isinstance(spec, list) else spec.get("choices") if isinstance(spec, dict) else None
        names += [c for c in choices or [] if isinstance(c, str)]
    warm = raw.get("warm_start") if isinstance(raw.get("warm_start"), dict) else {}
    for group in (sampler_raw.get("configs"), warm.get("configs")):
        items = group.values() if isinstance(group, dict) else group if isinstance(group, list) else []
        names += [c["family"] for c in items if isinstance(c, dict) and isinstance(c.get("family"), str)]
    out = []
    for name in dict.fromkeys(names):
        try:
            get_family(name)
            out.append(name)
        except FamilyError:
            pass  # reported where the name is used, with its key
    return out or ["cvfp"]


def _parameters(raw, problems, families=("cvfp",)) -> dict[str, Distribution]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"parameters: expected a mapping of field: distribution, got {shown(raw)}")
        return {}
    out: dict[str, Distribution] = {}
    for name, spec in raw.items():
        where = f"parameters.{shown(name, 60).strip(chr(39))}"
        try:
            canon = canonical_name(str(name), families)
        except KeyError as e:
            problems.append(f"{where}: {e.args[0]}")
            continue
        if canon in out:
            problems.append(f"{where}: {canon} is given twice")
            continue
        dist = parse_distribution(spec, where, problems)
        if dist is None:
            continue
        # every end of the range must itself be a valid value of the field
        probes = list(dist.choices) if dist.type == "categorical" else [dist.low, dist.high]
        owners = [f for f in families if _has_field(f, canon)] or [families[0]]
        for probe in probes:
            if not all(_check_field(canon, probe, where, problems, f) for f in owners):
                break
        out[canon] = dist
    return out


def _has_field(family: str, canon: str) -> bool:
    try:
        resolve_field(canon, family)
        return True
    except KeyError:
        return False


def _check_field(canon: str, value: Any, where: str, problems: list[str], family: str = "cvfp") -> bool:
    if canon == "family":
        from archsearch.families import FamilyError, get_family

        try:
            get_family(value)
        except FamilyError as e:
            problems += [f"{where}: {p.removeprefix('model.family: ')}" for p in e.problems]
            return False
        return True
    section, key = resolve_field(canon, family)
    model = {key: value} if section == "model" else {}
    if family != "cvfp":
        model["family"] = family
    try:
        run_config_from_dict({"model": model, **({section: {key: value}} if section != "model" else {})})
    except ConfigError as e:
        problems += [f"{where}: {p}" for p in e.problems]
        return False
    return True


def _configs(raw, where, base: RunConfig, problems, families=("cvfp",)) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if isinstance(raw, list):  # [{name: ..., num_layers: ...}, ...] is accepted too
        named = {}
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or "name" not in item:
                problems.append(f"{where}[{i}]: expected a mapping with a name")
                continue
            item = dict(item)
            named[str(item.pop("name"))] = item
        raw = named
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{where}: expected a non-empty mapping of name: {{field: value}}")
        return {}
    if len(raw) > MAX_GRID:
        problems.append(f"{where}: {len(raw):,} configs (limit {MAX_GRID:,})")
        return {}
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for name, fields in raw.items():
        why = name_problem(str(name))
        loc = f"{where}.{shown(str(name), 60).strip(chr(39))}"
        if why:
            problems.append(f"{loc}: config names are {why.removeprefix('must be ')}")
            continue
        if fields is None:
            fields = {}
        if not isinstance(fields, dict):
            problems.append(f"{loc}: expected a mapping of field: value, got {shown(fields)}")
            continue
        params = {}
        family = fields.get("family", base.family)
        if "family" in fields and not _check_field("family", family, f"{loc}.family", problems):
            continue
        for key, value in fields.items():
            try:
                canon = canonical_name(str(key), [family] if isinstance(family, str) else families)
            except KeyError as e:
                problems.append(f"{loc}.{shown(str(key), 60).strip(chr(39))}: {e.args[0]}")
                continue
            if _check_field(canon, value, f"{loc}.{key}" if canon == "family" else f"{loc}", problems, family if canon != "family" else "cvfp"):
                params[canon] = value
        n = len(problems)
        try:
            base.replace(**params)
        except ConfigError as e:
            problems += [f"{loc}: {p}" for p in e.problems]
            continue
        key = repr(sorted(params.items()))
        if key in seen:
            problems.append(f"{loc}: same settings as {seen[key]!r}")
            continue
        seen[key] = str(name)
        out[str(name)] = params
    return out


def grid_size(dist: Distribution) -> int | None:
    """Values of a finite distribution, counted without building them (None: continuous)."""
    if dist.type == "categorical":
        return len(dist.choices)
    if dist.type == "int":
        return (int(dist.high) - int(dist.low)) // int(dist.step or 1) + 1
    if dist.type == "float" and dist.step:
        return int(math.floor((dist.high - dist.low) / dist.step + 1e-9)) + 1
    return None


def _cartesian(parameters: dict[str, Distribution], base, problems) -> dict[str, dict[str, Any]]:
    total = 1
    for name, dist in parameters.items():
        n = grid_size(dist)
        if n is None:
            problems.append(f"parameters.{name}: a grid needs finite values (categorical, int, or float with step)")
            return {}
        total *= n
    if total > MAX_GRID:
        problems.append(f"parameters: the Cartesian grid has {total:,} points (limit {MAX_GRID:,})")
        return {}
    names, values = [], []
    for name, dist in parameters.items():
        try:
            vals = dist.grid_values()
        except ValueError:
            problems.append(f"parameters.{name}: a grid needs finite values (categorical, int, or float with step)")
            return {}
        names.append(name)
        values.append(vals)
    out = {}
    for combo in itertools.product(*values):
        params = dict(zip(names, combo))
        out[config_label(params)] = params
    return out


LABEL_NAMES = {"num_layers": "L", "context_dim": "C", "num_input_tokens": "k"}
"""Short names of CVFP's shape in config labels (the notation of cvfp.md)."""


def config_label(params: dict[str, Any]) -> str:
    """A config's name from its parameters, in their order: ``L=3,C=768,k=1,phase1.lr=0.001``
    (the shape short, other fields by their dotted names). A Cartesian grid names its points
    so and a sampler's proposals are named so, short enough for the dashboard's trial list;
    values as Python writes them, so distinct configs get distinct names."""
    return ",".join(f"{LABEL_NAMES.get(k, k)}={v}" for k, v in params.items())


# option -> (kind, low, high); kinds: int, float, float+ (above low), float? (or null), bool,
# prob (a float in [0, 1]), auto|int, choice
_SEED = ("int", 0, MAX_SEED)
_SAMPLER_OPTIONS: dict[str, dict[str, tuple]] = {
    "tpe": {"seed": _SEED, "n_startup_trials": ("int", 0, MAX_TRIALS), "n_ei_candidates": ("int", 1, 10_000),
            "multivariate": ("bool",), "group": ("bool",), "constant_liar": ("bool",), "consider_endpoints": ("bool",),
            "prior_weight": ("float+", 0, 1e6)},
    "random": {"seed": _SEED},
    "cmaes": {"seed": _SEED, "n_startup_trials": ("int", 0, MAX_TRIALS), "sigma0": ("float+", 0, 1e6),
              "restart_strategy": ("choice", ("ipop", "bipop")), "popsize": ("int", 1, 10_000), "with_margin": ("bool",)},
    "nsga2": {"seed": _SEED, "population_size": ("int", 2, 10_000), "mutation_prob": ("prob",),
              "crossover_prob": ("prob",), "swapping_prob": ("prob",)},
}  # fmt: skip
_PRUNER_OPTIONS: dict[str, dict[str, tuple]] = {
    "none": {},
    "median": {"n_startup_trials": ("int", 0, MAX_TRIALS), "n_warmup_steps": ("int", 0, 10**15), "n_min_trials": ("int", 1, MAX_TRIALS)},
    "percentile": {"percentile": ("float", 0, 100), "n_startup_trials": ("int", 0, MAX_TRIALS),
                   "n_warmup_steps": ("int", 0, 10**15), "n_min_trials": ("int", 1, MAX_TRIALS)},
    "threshold": {"lower": ("float?", -1e300, 1e300), "upper": ("float?", -1e300, 1e300), "n_warmup_steps": ("int", 0, 10**15)},
    "successive_halving": {"min_resource": ("auto|int", 1, 10**15), "reduction_factor": ("int", 2, 1000),
                           "min_early_stopping_rate": ("int", 0, 1000), "bootstrap_count": ("int", 0, MAX_TRIALS)},
    "hyperband": {"min_resource": ("int", 1, 10**15), "max_resource": ("auto|int", 1, 10**15),
                  "reduction_factor": ("int", 2, 1000), "bootstrap_count": ("int", 0, MAX_TRIALS)},
}  # fmt: skip


def _option_problem(spec: tuple, v: Any) -> str | None:
    """Why ``v`` is no value of an option of kind ``spec``, or None (the types Optuna's
    constructors take, checked here so a wrong one fails validation, not a running trial)."""
    kind = spec[0]
    if kind == "bool":
        return None if isinstance(v, bool) else "expected true/false"
    if kind == "choice":
        return None if isinstance(v, str) and v in spec[1] else f"expected one of {', '.join(spec[1])}"
    if kind == "auto|int" and v == "auto":
        return None
    if kind == "float?" and v is None:
        return None
    number = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if kind == "prob":
        return None if number and 0 <= v <= 1 else "expected a probability in [0, 1]"
    low, high = spec[1], spec[2]
    if kind in ("int", "auto|int"):
        if not number or not float(v).is_integer():
            return "expected an integer" + (" or auto" if kind == "auto|int" else "")
    elif not number:
        return "expected a finite number"
    if kind == "float+" and not low < v <= high:
        return f"must lie in ({low:g}, {high:g}]"
    if not low <= v <= high:
        return f"must lie in [{low:g}, {high:g}]"
    return None


def _sampler_options(sampler: str, options: dict, problems: list[str]) -> None:
    allowed = _SAMPLER_OPTIONS.get(sampler, {})
    for k, v in options.items():
        if k not in allowed:
            problems.append(f"sampler.{shown(k, 40).strip(chr(39))}: unknown option of the {sampler} sampler (known: {', '.join(allowed)})")
            continue
        why = _option_problem(allowed[k], v)
        if why:
            problems.append(f"sampler.{k}: {why}, got {shown(v)}")


def _early_stopping(raw, objectives, problems) -> dict[str, Any]:
    if raw is None or raw is False:
        return {"pruner": "none"}
    if isinstance(raw, str):
        raw = {"pruner": raw}
    if not isinstance(raw, dict):
        problems.append(f"early_stopping: expected a pruner name or a mapping, got {shown(raw)}")
        return {"pruner": "none"}
    pruner = raw.get("pruner", "median")
    if not isinstance(pruner, str) or pruner not in PRUNERS:
        problems.append(f"early_stopping.pruner: unknown pruner {shown(pruner)} (one of {', '.join(PRUNERS)})")
        return {"pruner": "none"}
    allowed = _PRUNER_OPTIONS[pruner]
    for k, v in raw.items():
        if k == "pruner":
            continue
        if k not in allowed:
            problems.append(f"early_stopping.{shown(k, 40).strip(chr(39))}: unknown option of the {pruner} pruner (known: {', '.join(allowed) or 'none'})")
            continue
        why = _option_problem(allowed[k], v)
        if why:
            problems.append(f"early_stopping.{k}: {why}, got {shown(v)}")
    if pruner == "percentile" and "percentile" not in raw:
        problems.append("early_stopping.percentile: the percentile pruner needs a percentile (0-100)")
    if pruner == "threshold" and raw.get("lower") is None and raw.get("upper") is None:
        problems.append("early_stopping: the threshold pruner needs lower and/or upper")
    lower, upper = raw.get("lower"), raw.get("upper")
    if pruner == "threshold" and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lower, upper)) and lower > upper:
        problems.append(f"early_stopping: lower ({lower:g}) is above upper ({upper:g})")
    if pruner != "none" and len(objectives) > 1:
        problems.append("early_stopping: Optuna cannot prune a multi-objective study; drop early_stopping or use one objective")
    return dict(raw, pruner=pruner)


def _capped(raw, base: RunConfig, problems) -> tuple[str, dict[str, int]]:
    if isinstance(raw, str) and raw in ("flag", "infeasible"):
        return raw, {}
    if not (isinstance(raw, dict) and set(raw) == {"retry"} and isinstance(raw["retry"], dict) and raw["retry"]):
        problems.append(f"capped: expected flag, infeasible or {{retry: {{phase1.max_iterations: N, phase2.max_epochs: N}}}}, got {raw!r}")
        return "flag", {}
    out = {}
    for k, v in raw["retry"].items():
        if k not in RETRY_KEYS:
            problems.append(f"capped.retry.{k}: only the caps can be raised ({', '.join(RETRY_KEYS)})")
            continue
        section, key = k.split(".")
        now = getattr(getattr(base, section, None), key, None)
        if now is None:
            problems.append(f"capped.retry.{k}: this space's runs have no such cap (the caps are CVFP's)")
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= now:
            problems.append(f"capped.retry.{k}: expected an integer above the space's {k} = {now}, got {v!r}")
            continue
        out[k] = v
    return "retry", out


def _admissible(raw, problems) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"admissible: expected a mapping like {{max_ppl_ratio: 1.5}}, got {raw!r}")
        return {}
    out = {}
    for k, v in raw.items():
        if k != "max_ppl_ratio":
            problems.append(f"admissible.{k}: unknown rule (known: max_ppl_ratio)")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 1:
            problems.append(f"admissible.max_ppl_ratio: expected a factor >= 1, got {v!r}")
        else:
            out[k] = float(v)
    return out


def _constraints(raw, problems) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"constraints: expected a mapping, got {shown(raw)}")
        return {}
    known = ("max_phase1_params", "max_phase2_params", "max_total_params")
    out = {}
    for k, v in raw.items():
        if k not in known:
            problems.append(f"constraints.{shown(k, 40).strip(chr(39))}: unknown constraint (known: {', '.join(known)})")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            problems.append(f"constraints.{k}: expected a positive finite number, got {shown(v)}")
        else:
            out[k] = float(v)
    return out
