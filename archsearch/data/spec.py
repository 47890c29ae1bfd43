"""What data a study trains on: :class:`DataSpec` and its validation.

A spec is pure data (no heavy imports). :func:`data_spec_from_dict` builds one from the
``data:`` section of a space file and reports every problem at once; :func:`check_data_spec`
runs the same value checks on a spec built in code.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archsearch.errors import ConfigError, shown

SOURCES = ("wiki", "ultrachat", "files")
SIZE_UNITS = ("samples", "tokens")
FORMATS = ("auto", "text", "json", "parquet")

DEFAULT_TOKENIZER = {"wiki": "minilm", "ultrachat": "gpt2", "files": "minilm"}
"""Tokenizer (and embedding) of each source when ``DataSpec.tokenizer`` is None."""
ALIASES = ("minilm", "gpt2")
"""Tokenizer names that are never read as local folders."""

# File extension -> format (named as HF `datasets` names its builders), for format="auto".
EXTENSION_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


@dataclass
class DataSpec:
    source: str = "wiki"
    """wiki (offline, shipped with gensim) | ultrachat (the report's data) | files (local)."""
    sizes: list[int] = field(default_factory=list)
    """Training sizes of a study, strictly increasing, each >= 1 (in ``size_unit``)."""
    size_unit: str = "tokens"
    """samples (documents: conversations / articles / files' rows, as the report) | tokens."""
    tokenizer: str | None = None
    """Tokenizer + frozen embedding: minilm | gpt2 | a Hub repo id | a local folder holding
    tokenizer.json and model.safetensors. None = the source's default (DEFAULT_TOKENIZER)."""
    embedding_key: str | None = None
    """Tensor of model.safetensors holding the embedding; None = first of EMBEDDING_KEYS present."""

    # ultrachat
    dataset: str = "HuggingFaceH4/ultrachat_200k"
    """Hub dataset id, or a local folder in the Hub's layout (data/<split>-*.parquet)."""
    split: str = "train_sft"
    """Split whose first conversations are the training data."""
    val_start: int = 1000
    """First validation conversation (training may use only conversations before it)."""
    val_count: int = 20
    """Validation conversations val_start .. val_start+val_count-1, joined by a blank line."""

    # files
    paths: list[str] = field(default_factory=list)
    """Local corpus files, in order: .txt (a whole file is one document), .jsonl/.json, .parquet."""
    format: str = "auto"
    """auto (from each file's extension) | text | json | parquet."""
    text_field: str = "text"
    """Column holding a document's text in json/parquet files."""
    val_paths: list[str] = field(default_factory=list)
    """Validation files; if empty, documents are held out from the end (see val_tokens)."""

    # wiki, and files without val_paths
    val_tokens: int = 30000
    """Validation = the first val_tokens tokens of whole documents held out from the END of the corpus."""
    min_article_chars: int = 500
    """wiki: drop articles shorter than this after markup is stripped (redirects always dropped)."""

    cache_dir: str | None = None
    """Where prepared folders live; None = $ARCHSEARCH_HOME/data (ARCHSEARCH_HOME default ./studies)."""

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer actually used: the given one or the source's default."""
        return self.tokenizer or DEFAULT_TOKENIZER.get(self.source, "minilm")

    def resolved_cache_dir(self) -> Path:
        """Absolute cache folder (resolve it in the driver before sending a spec to workers
        that run in another directory)."""
        root = self.cache_dir or os.path.join(os.environ.get("ARCHSEARCH_HOME") or "studies", "data")
        return Path(root).expanduser().absolute()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that only one kind of source reads: setting them (to a non-default value) for
# another source is almost always a forgotten ``source:`` line, so it is reported.
_SOURCE_FIELDS = {
    "dataset": ("ultrachat",),
    "split": ("ultrachat",),
    "val_start": ("ultrachat",),
    "val_count": ("ultrachat",),
    "paths": ("files",),
    "format": ("files",),
    "text_field": ("files",),
    "val_paths": ("files",),
    "val_tokens": ("wiki", "files"),
    "min_article_chars": ("wiki",),
}

# Upper bounds (README, "Limits (chosen)"): a training stream of 10^10 tokens is 40 GB of
# int32 tokens, about what one host's memory and one GPU's run can take.
MAX_TOKENS = 10**10
MAX_SAMPLES = 10**8
MAX_SIZES = 1_000
MAX_PATHS = 100_000

# (kind, lower bound, upper bound) of every field but sizes; kinds: str, str?, int, paths.
_KINDS: dict[str, tuple[str, int | None, int | None]] = {
    "source": ("str", None, None),
    "size_unit": ("str", None, None),
    "tokenizer": ("str?", None, None),
    "embedding_key": ("str?", None, None),
    "dataset": ("str", None, None),
    "split": ("str", None, None),
    "val_start": ("int", 0, MAX_SAMPLES),
    "val_count": ("int", 1, 1_000_000),
    "paths": ("paths", None, None),
    "format": ("str", None, None),
    "text_field": ("str", None, None),
    "val_paths": ("paths", None, None),
    "val_tokens": ("int", 1, 100_000_000),
    "min_article_chars": ("int", 0, 10**9),
    "cache_dir": ("str?", None, None),
}


def _as_int(value: Any) -> int | None:
    """An int, or an integral float such as 6.2e4 (YAML reads 6.2e4 as a float); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _parse_field(loc: str, kind: str, low: int | None, value: Any, problems: list[str], high: int | None = None) -> Any:
    if kind == "str?" and value is None:
        return None
    if kind in ("str", "str?"):
        if not isinstance(value, str) or not value:
            problems.append(f"{loc}: expected a non-empty string, got {shown(value)}")
            return dataclasses.MISSING
        return value
    if kind == "int":
        v = _as_int(value)
        if v is None:
            problems.append(f"{loc}: expected an integer, got {shown(value)}")
            return dataclasses.MISSING
        if low is not None and v < low:
            problems.append(f"{loc}: must be >= {low}, got {shown(value)}")
            return dataclasses.MISSING
        if high is not None and v > high:
            problems.append(f"{loc}: must be <= {high:,}, got {shown(value)}")
            return dataclasses.MISSING
        return v
    if kind == "paths":
        if isinstance(value, str):  # a single file may be written without a list
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
            problems.append(f"{loc}: expected a list of file paths, got {shown(value)}")
            return dataclasses.MISSING
        if len(value) > MAX_PATHS:
            problems.append(f"{loc}: {len(value):,} files (limit {MAX_PATHS:,})")
            return dataclasses.MISSING
        return list(value)
    raise AssertionError(kind)


def _parse_sizes(loc: str, raw: Any, problems: list[str]) -> tuple[list[int] | None, str | None]:
    """``[...]`` or ``{"samples": [...]}`` / ``{"tokens": [...]}`` -> (sizes, unit or None)."""
    unit = None
    if isinstance(raw, dict):
        if len(raw) != 1 or next(iter(raw)) not in SIZE_UNITS:
            problems.append(f"{loc}: a mapping must have exactly one key, samples or tokens, got {shown(list(raw))}")
            return None, None
        unit, raw = next(iter(raw.items()))
        loc = f"{loc}.{unit}"
    if not isinstance(raw, (list, tuple)):
        problems.append(f"{loc}: expected a list of sizes, got {shown(raw)}")
        return None, unit
    if len(raw) > MAX_SIZES:
        problems.append(f"{loc}: {len(raw):,} sizes (limit {MAX_SIZES:,})")
        return None, unit
    high = MAX_SAMPLES if unit == "samples" else MAX_TOKENS
    sizes, ok = [], True
    for i, value in enumerate(raw):
        v = _as_int(value)
        if v is None or v < 1:
            problems.append(f"{loc}[{i}]: expected an integer >= 1, got {shown(value)}")
            ok = False
        elif v > high:
            problems.append(f"{loc}[{i}]: must be <= {high:,} {unit or 'tokens'} (see the README's limits), got {shown(value)}")
            ok = False
        sizes.append(v)
    return (sizes if ok else None), unit


def data_spec_from_dict(d: dict[str, Any] | None, where: str = "data", require_sizes: bool = False) -> DataSpec:
    """Build and check a DataSpec from a mapping (missing keys take their defaults).

    Sizes are ``sizes: [...]`` plus ``size_unit``, or the space-file form
    ``sizes: {samples: [...]}`` / ``{tokens: [...]}``. Local paths (corpus files, and
    tokenizer / dataset / cache folders that exist) are made absolute, so the spec means the
    same in a worker started in another directory. Raises one ConfigError listing every
    problem, each prefixed with ``where`` and the key."""
    problems: list[str] = []
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError([f"{where}: expected a mapping of data settings, got {d!r}"])
    names = {f.name for f in dataclasses.fields(DataSpec)}
    values: dict[str, Any] = {}
    for key, value in d.items():
        loc = f"{where}.{key}"
        if key not in names:
            problems.append(f"{loc}: unknown key (keys: {', '.join(sorted(names))})")
        elif key == "sizes":
            sizes, unit = _parse_sizes(loc, value, problems)
            if sizes is not None:
                values["sizes"] = sizes
            if unit is not None:
                given = d.get("size_unit")
                if given is not None and given != unit:
                    problems.append(f"{where}.size_unit: {given!r} contradicts {loc} given in {unit}")
                values["size_unit"] = unit
        elif key == "size_unit" and "size_unit" in values:
            continue  # already set (and compared) by the mapping form of sizes
        else:
            kind, low, high = _KINDS[key]
            v = _parse_field(loc, kind, low, value, problems, high)
            if v is not dataclasses.MISSING:
                values[key] = v
    spec = DataSpec(**values)
    _absolutize(spec)
    problems.extend(spec_problems(spec, where, require_sizes, given=set(d)))
    if problems:
        raise ConfigError(problems)
    return spec


def _absolutize(spec: DataSpec) -> None:
    spec.paths = [os.path.abspath(os.path.expanduser(p)) for p in spec.paths]
    spec.val_paths = [os.path.abspath(os.path.expanduser(p)) for p in spec.val_paths]
    for name in ("tokenizer", "dataset"):
        value = getattr(spec, name)
        if value and value not in ALIASES and Path(value).expanduser().is_dir():
            setattr(spec, name, os.path.abspath(os.path.expanduser(value)))
    if spec.cache_dir:
        spec.cache_dir = os.path.abspath(os.path.expanduser(spec.cache_dir))


def check_data_spec(spec: DataSpec, where: str = "data", require_sizes: bool = False) -> None:
    """Raise one ConfigError listing every problem of a spec built in code."""
    problems = spec_problems(spec, where, require_sizes)
    if problems:
        raise ConfigError(problems)


def spec_problems(
    spec: DataSpec, where: str = "data", require_sizes: bool = False, given: set[str] | None = None
) -> list[str]:
    """Every problem with the values of ``spec`` (types are checked by data_spec_from_dict).

    ``given``: the keys a mapping set; settings of another source are reported only among them."""
    problems: list[str] = []
    if spec.source not in SOURCES:
        problems.append(f"{where}.source: unknown source {spec.source!r} (one of {', '.join(SOURCES)})")
    if spec.size_unit not in SIZE_UNITS:
        problems.append(f"{where}.size_unit: unknown unit {spec.size_unit!r} (one of {', '.join(SIZE_UNITS)})")
    if spec.format not in FORMATS:
        problems.append(f"{where}.format: unknown format {spec.format!r} (one of {', '.join(FORMATS)})")

    sizes = spec.sizes
    if require_sizes and not sizes:
        problems.append(f"{where}.sizes: no training sizes given")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        problems.append(f"{where}.sizes: every size must be an integer >= 1, got {shown(sizes)}")
        sizes = []  # the checks below compare numbers
    dups = sorted(s for s, n in collections.Counter(sizes).items() if n > 1)  # linear: 60,000 sizes are instant
    if dups:
        problems.append(f"{where}.sizes: duplicate sizes {shown(dups)}")
    elif any(a >= b for a, b in zip(sizes, sizes[1:])):
        problems.append(f"{where}.sizes: must be strictly increasing, got {shown(sizes)}")

    defaults = DataSpec()
    if spec.source in SOURCES:
        for name, sources in _SOURCE_FIELDS.items():
            differs = getattr(spec, name) != getattr(defaults, name)
            if spec.source not in sources and (differs if given is None else name in given and differs):
                problems.append(
                    f"{where}.{name}: only used with source {' or '.join(sources)} (source is {spec.source!r})"
                )

    if spec.source == "files":
        if not spec.paths:
            problems.append(f"{where}.paths: source 'files' needs at least one corpus file")
        for key in ("paths", "val_paths"):
            for i, p in enumerate(getattr(spec, key)):
                problems.extend(_file_problems(f"{where}.{key}[{i}]", p, spec.format))
        if not spec.text_field:
            problems.append(f"{where}.text_field: must not be empty")

    if spec.source == "ultrachat" and sizes and spec.size_unit == "samples" and max(sizes) > spec.val_start:
        problems.append(
            f"{where}.sizes: {max(sizes)} training conversations would overlap the validation "
            f"conversations {spec.val_start}..{spec.val_start + spec.val_count - 1} "
            f"(at most {spec.val_start}; raise {where}.val_start to train on more)"
        )
    return problems


def file_format(path: str, fmt: str = "auto") -> str | None:
    """The format of ``path`` (text, json, parquet): ``fmt`` itself, or the one its extension names."""
    if fmt != "auto":
        return fmt
    return EXTENSION_FORMATS.get(Path(path).suffix.lower())


def _file_problems(loc: str, path: str, fmt: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        return [f"{loc}: no such file: {path}"]
    if not p.is_file():
        return [f"{loc}: not a file: {path}"]
    if not os.access(p, os.R_OK):
        return [f"{loc}: file is not readable: {path}"]
    if fmt in FORMATS and file_format(path, fmt) is None:
        known = ", ".join(EXTENSION_FORMATS)
        return [f"{loc}: cannot tell the format of {p.name} from its extension ({known}); set data.format"]
    return []
