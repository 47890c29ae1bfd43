"""Model families: what a trial trains, behind one small protocol (pure: no Optuna, no Ray).

A *family* is a kind of language model that archsearch can train at every data size of a
space and fit a scaling law to. It is any object with these attributes (``Family`` below is
a ready-made holder for them):

``name``
    Short identifier (letters, digits, ``_ - .``): recorded with every run and trial.
``config``
    A dataclass of the family's fields, every one with a default. A space file sets them
    under ``model:`` (``model: {family: gpt, num_layers: 4}``); searched parameters and
    ``key=value`` overrides name them bare (``d_model``). Fields are ``int``, ``float``,
    ``bool`` or ``str``; bounds go in the field's metadata (``low``, ``high``, ``choices``,
    ``strict_low``) so that nothing huge is ever allocated, and an optional
    ``problems(self) -> list[str]`` method adds cross-field checks. :func:`config_from_dict`
    builds one and lists every problem with its key.
``param_counts(cfg, embed_dim, vocab_size) -> dict[str, int]``
    Trainable parameters by part, from the config alone (no model is built); always with
    ``"total"``.
``train(cfg, data: RunData, seed, device, progress) -> RunResult``
    One run: trains on ``data.train_ids``, validates on ``data.val_ids`` and returns an
    :class:`archsearch.result.RunResult` (validation loss, its standard error, PPL and accuracy
    over the validation targets, per-phase seconds, parameter counts, the family's own
    numbers in ``metrics``). Deterministic for a seed on a device. ``progress(event, **info)``
    may be called with ``"phase2"`` events (``epoch``, ``max_epochs``, ``val_ppl``,
    ``val_acc``: one per epoch) for the live view and ``archsearch trial``'s progress line.
``version`` (optional, default 1)
    Bump it when the family's computation changes: it is part of the run-cache key.
``train_many(cfg, runs, device, may_stop) -> Iterator | None`` (optional)
    Several runs of one config at once, where the family gains by it (CVFP: a trial's sizes
    and seeds staged, their validation passes batched; ``engine.stage_sizes``). ``runs`` is a
    list of ``(data: RunData, seed, progress)`` sharing one embedding and validation stream;
    ``may_stop``: whether the caller may stop after any run (a pruner). Returns None where it
    does not apply (then the runs go through ``train`` one after another), else an iterator
    yielding for each run, in order, its RunResult or the exception it failed with (then
    nothing more); an out-of-memory exception means: train this run and the rest one after
    another. Closing the iterator early drops what it holds. The numbers are those of
    ``train``.
``release() -> bool`` (optional)
    Drop what the family keeps between runs in the calling thread (CVFP: its kept phase-2
    session, CUDA graphs and buffers) and say whether anything was kept. A trial calls it
    after a failed run, before it frees the allocator's cache, and a worker after a failed trial.
``gpu_memory(cfg, train_tokens, val_tokens, vocab_size, embed_dim) -> (peak, kept)`` (optional)
    An upper estimate, in bytes, of what one trial allocates on a GPU at its peak (as
    ``torch.cuda.max_memory_allocated`` counts it) when it trains at each of ``train_tokens``
    (a list: the sizes' training-token counts) and of what stays allocated after it for the
    worker's next trial. ``resources.gpus: auto`` puts several trials on one GPU only for
    families that give it (:mod:`archsearch.resources`); CVFP's is :mod:`archsearch.cvfp.memory`.

Built-in families: ``cvfp`` (the default; :mod:`archsearch.families.cvfp`) and ``gpt``
(:mod:`archsearch.families.gpt`). A user's family is named in a space file by
``package.module:attr``, by ``path/to/file.py:attr`` (relative to the current directory), or
by the name it is registered under in the ``archsearch.families`` entry-point group of an
installed distribution (``[project.entry-points."archsearch.families"] lstm =
"mypkg.lstm:family"``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archsearch.errors import ConfigError, bound_problem
from archsearch.result import RunResult

__all__ = [
    "BUILTIN",
    "DEFAULT_FAMILY",
    "Family",
    "FamilyError",
    "RunData",
    "config_from_dict",
    "config_to_dict",
    "field_names",
    "get_family",
    "known_families",
]

DEFAULT_FAMILY = "cvfp"
BUILTIN = {"cvfp": "archsearch.families.cvfp:family", "gpt": "archsearch.families.gpt:family"}
ENTRY_POINT_GROUP = "archsearch.families"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

Progress = Callable[..., None]


@dataclass
class RunData:
    """What one run reads: the frozen pretrained embedding and the two token streams."""

    embedding: Any
    """(V, E) float32 tensor: the source's pretrained embedding (frozen unless a family trains it)."""
    train_ids: Any
    """(N,) int64 tensor: the training prefix of this size."""
    val_ids: Any
    """(M,) int64 tensor: the validation stream, the same for every run and family. A run
    predicts tokens 1..M-1 (M-1 targets), each from the tokens before it."""


@dataclass(frozen=True)
class Family:
    """A ready-made holder of the protocol's attributes (any object with them will do)."""

    name: str
    config: type
    param_counts: Callable[[Any, int, int], dict[str, int]]
    train: Callable[..., RunResult]
    version: int = 1
    description: str = ""
    release: Callable[[], bool] | None = None
    gpu_memory: Callable[[Any, list[int], int, int, int], tuple[int, int]] | None = None
    train_many: Callable[..., Any] | None = None


class FamilyError(ConfigError):
    """A family that cannot be found, imported or used (a usage error: exit 2)."""


# --------------------------------------------------------------------------- finding families

_loaded: dict[str, Any] = {}


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    try:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # a broken installed distribution must not break the built-ins
        return {}


def known_families() -> list[str]:
    """Names usable without a ``module:attr``: the built-ins and the installed entry points."""
    return list(BUILTIN) + sorted(n for n in _entry_points() if n not in BUILTIN)


def get_family(spec: str) -> Any:
    """The family object named by ``spec`` (built-in name, entry-point name, ``module:attr`` or
    ``file.py:attr``), checked against the protocol. Raises :class:`FamilyError` naming it."""
    if not isinstance(spec, str) or not spec.strip():
        raise FamilyError(f"model.family: expected a family name, got {spec!r} (known: {', '.join(known_families())})")
    if spec in _loaded:
        return _loaded[spec]
    if spec in BUILTIN:
        fam = _import_attr(BUILTIN[spec], spec)
    elif ":" in spec:
        fam = _import_attr(spec, spec)
    else:
        eps = _entry_points()
        if spec not in eps:
            raise FamilyError(
                f"model.family: unknown family {spec!r} (known: {', '.join(known_families())}; "
                "or name your own as package.module:attr or path/to/file.py:attr)"
            )
        try:
            fam = eps[spec].load()
        except Exception as e:
            raise FamilyError(f"model.family: family {spec!r} (entry point {eps[spec].value}) failed to load: {type(e).__name__}: {e}") from None
    # cvfp's config is the whole multi-section RunConfig (archsearch.config), not a flat dataclass
    problems = protocol_problems(fam) if spec != DEFAULT_FAMILY else []
    if problems:
        raise FamilyError([f"model.family: {spec!r} does not follow the family protocol: {p}" for p in problems])
    _loaded[spec] = fam
    return fam


def _import_attr(target: str, spec: str) -> Any:
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise FamilyError(f"model.family: {spec!r}: expected package.module:attr or path/to/file.py:attr")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name).resolve()
            if not path.is_file():
                raise FamilyError(f"model.family: {spec!r}: no such file {module_name}")
            mod_name = f"_archsearch_family_{abs(hash(str(path)))}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module  # dataclasses look their module up while the file runs
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        else:
            module = _import_here_too(module_name)
    except FamilyError:
        raise
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise FamilyError(f"model.family: {spec!r}: no module named {e.name!r} (is it on PYTHONPATH?)") from None
        raise FamilyError(f"model.family: {spec!r} raised on import: ModuleNotFoundError: {e}") from None
    except Exception as e:
        raise FamilyError(f"model.family: {spec!r} raised on import: {type(e).__name__}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise FamilyError(f"model.family: {spec!r}: module {module_name!r} has no attribute {attr!r}") from None


def _import_here_too(module_name: str) -> Any:
    """``importlib.import_module``, then, if its top package is not on the path, once more with
    the current directory at the end of ``sys.path``: what ``python -m`` and Ray's workers (the
    driver's directory) give, and the ``archsearch`` console script does not, so that
    ``examples.lstm_family:family`` names the file from the repository root as the README says."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        if e.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
    sys.path.append(here)  # kept: the run's later imports of this module (a worker's pickles) find it
    importlib.invalidate_caches()
    return importlib.import_module(module_name)


def protocol_problems(fam: Any) -> list[str]:
    """What keeps ``fam`` from being a family (empty when it is one)."""
    out = []
    name = getattr(fam, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        out.append(f"name must be a string of letters, digits, '_', '-', '.', got {name!r}")
    cfg = getattr(fam, "config", None)
    if not (isinstance(cfg, type) and dataclasses.is_dataclass(cfg)):
        out.append(f"config must be a dataclass type, got {cfg!r}")
    else:
        for f in dataclasses.fields(cfg):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                out.append(f"config field {f.name!r} has no default")
            if _type_name(f) not in ("int", "float", "bool", "str"):
                out.append(f"config field {f.name!r} has type {f.type!r}; fields are int, float, bool or str")
            if f.name == "family":
                out.append("config has a field named 'family' (the key that names the family)")
    for attr in ("param_counts", "train"):
        if not callable(getattr(fam, attr, None)):
            out.append(f"{attr} must be callable")
    for attr in ("release", "gpu_memory", "train_many"):
        if getattr(fam, attr, None) is not None and not callable(getattr(fam, attr)):
            out.append(f"{attr} must be callable or None")
    version = getattr(fam, "version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        out.append(f"version must be an integer, got {version!r}")
    return out


# --------------------------------------------------------------------------- configs


def _type_name(f: dataclasses.Field) -> str:
    t = f.type
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, raw: dict[str, Any] | None, where: str = "model") -> Any:
    """An instance of the family config ``cls`` from ``raw`` (missing keys keep defaults).

    Raises one ConfigError listing every unknown key, wrong type, out-of-bounds value and
    cross-field problem, each with its key (``where.field``)."""
    raw = raw or {}
    problems: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        loc = f"{where}.{key}"
        if key not in fields:
            problems.append(f"{loc}: unknown field (fields of {where}: {', '.join(fields)})")
            continue
        f = fields[key]
        v = _coerce(loc, value, _type_name(f), problems)
        if v is None:
            continue
        if _check_bounds(loc, v, f.metadata, problems):
            values[key] = v
    if problems:
        raise ConfigError(problems)
    cfg = cls(**values)
    check = getattr(cfg, "problems", None)
    if callable(check):
        problems += [p if p.startswith(where) else f"{where}.{p}" for p in check()]
    if problems:
        raise ConfigError(problems)
    return cfg


def _coerce(where: str, value: Any, typ: str, problems: list[str]) -> Any:
    if typ == "bool":
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true/false, got {value!r}")
        return None
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            problems.append(f"{where}: expected an integer, got {value!r}")
            return None
        return int(value)
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{where}: expected a finite number, got {value!r}")
            return None
        return float(value)
    if typ == "str":
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
            return None
        return value
    problems.append(f"{where}: field type {typ!r} is not supported")
    return None


def _check_bounds(where: str, v: Any, meta: Any, problems: list[str]) -> bool:
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        problems.append(f"{where}: must be one of {', '.join(map(str, choices))}, got {v!r}")
        return False
    why = "limit chosen so that nothing huge is allocated"
    problem = bound_problem(where, v, meta.get("low"), meta.get("high"), strict_low=meta.get("strict_low", False), why=why)
    if problem is not None:
        problems.append(problem)
    return problem is None


def bounded(default: Any, low: float | None = None, high: float | None = None, *, strict_low: bool = False,
            choices: tuple | None = None, doc: str = "") -> Any:
    """A dataclass field with its bounds in the metadata (read by :func:`config_from_dict`)."""
    meta = {"low": low, "high": high, "strict_low": strict_low, "choices": choices, "doc": doc}
    return dataclasses.field(default=default, metadata=meta)
