"""``archsearch`` command line: thin commands over the library.

Every command that takes a space file also takes dotted ``key=value`` overrides, with one
meaning everywhere (:func:`archsearch.space.apply_run_overrides`). Usage and config errors
print one message naming every problem and exit with 2.

Help is click's plain layout (``rich_markup_mode=None``): typer's rich panels show a type
such as ``<bool>`` after every flag, so ``--dry-run`` would read as if it took a value.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from archsearch.console import console, data_progress, err_console, fit_lines, fmt_count, sizes_table
from archsearch.errors import ConfigError, UserError, shown

PROG = "archsearch"

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Architecture search with scaling-law objectives for the CVFP language model.",
)

SpaceArg = typer.Argument(..., metavar="SPACE", help="space file (YAML), e.g. spaces/quickstart.yaml")
OverridesArg = typer.Argument(
    None,
    metavar="KEY=VALUE",
    help="dotted overrides of the space file, values in YAML: phase2.max_epochs=2, \"data.sizes={tokens: [1000, 2000, 4000]}\", "
    "sampler.configs.baseline.num_layers=3. A run field (model.*, phase1.*, phase2.*, engine.*) applies to every "
    "trial: it replaces a named config's own value and fixes a searched field; each such effect is printed as a note.",
)


def version() -> str:
    """archsearch's version: the installed distribution's, else the source tree's (``+src``)."""
    from archsearch import __version__

    return __version__


def _print_version(value: bool) -> None:
    if value:
        console.print(f"{PROG} {version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"),
) -> None:
    """Architecture search with scaling-law objectives for the CVFP language model.

    Start with: archsearch run spaces/quickstart.yaml, then archsearch dashboard.
    """


def _print_notes(sp) -> None:
    """What the overrides did beyond their own key (a config's value replaced, ...)."""
    for note in sp.notes:
        err_console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


FIT_CSV_BYTES = 1024 * 1024
TABLE_ROWS = 100
"""Configs a `validate` / `--dry-run` table shows (a 10,000-point grid is listed in --json)."""


def check_outputs(json_path: Path | None = None, out: Path | None = None) -> None:
    """``--json`` must name a file that can be written and ``--out`` a folder: checked first,
    so that a command never runs (or trains) to fail at its last step."""
    from archsearch import paths

    problems = []
    if json_path is not None:
        why = paths.write_problem(json_path)
        if why:
            problems.append(f"--json {json_path}: {why}")
    if out is not None:
        why = paths.folder_problem(out)
        if why:
            problems.append(f"--out {out}: {why}")
    if problems:
        raise ConfigError(problems)


def check_study_name(name: str | None) -> None:
    """A study name becomes folders (reports, Ray's results): checked like ``study.name``."""
    from archsearch import paths

    why = paths.name_problem(name) if name is not None else None
    if why:
        raise ConfigError(f"--study {shown(name)}: {why}")


def _write_json(path: Path | None, payload: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    return device


# --------------------------------------------------------------------------- trial


@app.command(short_help="Train one architecture across the sizes and fit its law.")
def trial(
    space: Path = SpaceArg,
    overrides: Optional[list[str]] = OverridesArg,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="named config of the space (default: the first)"),
    device: str = typer.Option("auto", help="auto (cuda when available), cpu, cuda, cuda:N"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the trial's result record here"),
    no_cache: bool = typer.Option(False, "--no-cache", help="train every run even if the run cache has it"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress, only the result"),
) -> None:
    """Train one architecture across the space's sizes and fit its scaling law.

    The architecture is the space's first config, or --config NAME; overrides apply as in
    run and validate. No Ray, no Optuna.

    Examples:

    \b
      archsearch trial spaces/quickstart.yaml --config layers_3 phase2.max_epochs=1
      archsearch trial spaces/quickstart.yaml model.context_dim=32 "data.sizes={tokens: [1000, 2000, 4000]}"
    """
    from archsearch.config import run_param_counts
    from archsearch.plan import chosen_config, prepare_space_data, trial_plan
    from archsearch.space import load_space

    overrides = overrides or []
    check_outputs(json_path)
    sp = load_space(space, overrides)
    _print_notes(sp)
    name, params = chosen_config(sp, config)
    dev = resolve_device(device)
    data = prepare_space_data(sp, data_progress(quiet))
    plan = trial_plan(sp, params, name=name, data_path=str(data.path), use_cache=not no_cache, device=dev)
    cfg = plan.run_config
    counts = run_param_counts(cfg, data.embed_dim, data.vocab_size)
    if not quiet:
        parts = ", ".join(f"{k.removesuffix('_params').replace('phase', 'phase ')} {fmt_count(v)}" for k, v in counts.items() if k != "total_params")
        err_console.print(
            f"trial [bold]{name}[/bold] ({cfg.family}) {params}: {parts} params; {len(sp.data.sizes)} sizes x {len(sp.seeds)} seeds on {dev}"
        )
    from archsearch.result import SizeRecord

    result = _run_with_progress(plan, quiet)
    console.print(sizes_table([SizeRecord.from_dict(r) for r in result["sizes"]], title=f"{name}: {sp.data.source}, {data.embed_dim}-d embeddings"))
    for line in fit_lines(result["fit"]):
        console.print(line)
    objective_text = ", ".join(f"{k} = {v:.4g}" if v is not None else f"{k} = -" for k, v in result["objectives"].items())
    console.print(f"objective: {objective_text};  {result['seconds']:.1f} s on {result['device']}")
    _write_json(json_path, result)


def _run_with_progress(plan, quiet: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from archsearch.trial import run_trial

    if quiet:
        return run_trial(plan)
    n = len(plan.sizes)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("starting", total=n)

        def progress(event, size, size_index, seed, **info):
            head = f"size {size_index + 1}/{n} ({size:,} {plan.size_unit}, seed {seed})"
            if event == "phase1":
                text = f"{head}: phase 1 iteration {info['iteration']}/{info['max_iterations']}, converged {100 * info['convergence_rate']:.0f}%"
            elif event == "contexts":
                text = f"{head}: context caches (recurrent validation pass)"
            elif event == "phase2":
                text = f"{head}: phase 2 epoch {info['epoch']}/{info['max_epochs']}, val PPL {info['val_ppl']:.1f}"
            elif event == "cached":
                text = f"{head}: from the run cache"
            elif event == "notice":
                bar.console.print(f"[yellow]notice:[/yellow] {info['message']}")
                return
            else:
                text = f"{head}: {event}"
            bar.update(task, description=text, completed=size_index)

        def on_size(record, partial):
            bar.update(task, completed=len(partial["sizes"]))
            bar.console.print(
                f"  {record.size:,} {plan.size_unit}: val PPL {record.val_ppl:.1f}, acc {100 * record.val_acc:.1f}%"
                + (" (cached)" if record.cached else f" ({record.seconds:.1f} s)")
                + (f" [yellow]capped: {', '.join(record.capped)}[/yellow]" if record.capped else "")
            )

        return run_trial(plan, on_size=on_size, progress=progress)


# --------------------------------------------------------------------------- fit


@app.command()
def fit(
    csv_path: Path = typer.Argument(..., metavar="FILE.csv", help="columns tokens,ppl (a header row)"),
    target_tokens: Optional[float] = typer.Option(None, "--target-tokens", "-t", help="extrapolate PPL to this many tokens"),
    level: float = typer.Option(0.95, help="confidence level of the interval"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the fit here"),
) -> None:
    """Fit PPL = A * tokens^alpha to a CSV of (tokens, ppl).

    Examples:

    \b
      archsearch fit docs/examples/baseline_sizes.csv --target-tokens 1e7
    """
    from archsearch.scaling import fit_power_law

    import math

    check_outputs(json_path)
    if target_tokens is not None and not (math.isfinite(target_tokens) and 0 < target_tokens <= 1e15):
        raise ConfigError(f"--target-tokens: expected a token count in (0, 1e15], got {target_tokens:g}")
    if not (math.isfinite(level) and 0 < level < 1):
        raise ConfigError(f"--level: expected a confidence level between 0 and 1, got {level:g}")
    tokens, ppl = read_fit_csv(csv_path)
    result = fit_power_law(tokens, ppl, level=level)
    d = result.to_dict(target_tokens)
    for line in fit_lines(d):
        console.print(line)
    _write_json(json_path, d)


def read_fit_csv(path: Path) -> tuple[list[float], list[float]]:
    try:
        with path.open("rb") as f:
            data = f.read(FIT_CSV_BYTES + 1)
        if len(data) > FIT_CSV_BYTES:
            raise ConfigError(f"{path}: a fit CSV is at most {FIT_CSV_BYTES // 1024 // 1024} MiB (one row per size)")
        text = data.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected a CSV with columns tokens,ppl") from None
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or rows[0] is None:
        raise ConfigError(f"{path}: no data rows (expected a header 'tokens,ppl' and one row per size)")
    header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
    missing = [c for c in ("tokens", "ppl") if c not in header]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)} (header is {', '.join(header)})")
    tokens, ppl, problems = [], [], []
    for i, row in enumerate(rows, start=2):
        row = {k.strip().lower(): v for k, v in row.items() if k}
        try:
            tokens.append(float(str(row["tokens"]).replace(",", "").replace("_", "")))
            ppl.append(float(row["ppl"]))
        except (TypeError, ValueError):
            problems.append(f"{path}:{i}: not a number in {row}")
    if problems:
        raise ConfigError(problems)
    return tokens, ppl


# --------------------------------------------------------------------------- validate


@app.command(short_help="Check a space file without running it.")
def validate(
    space: Path = SpaceArg,
    overrides: Optional[list[str]] = OverridesArg,
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the resolved space and its configs here"),
) -> None:
    """Check a space file without running it; list its configs and parameter counts.

    Writes nothing (not even prepared data). Exit 0: valid; 2: every problem listed.

    Examples:

    \b
      archsearch validate spaces/grid_4arch.yaml
      archsearch validate spaces/quickstart.yaml model.context_dim=32
    """
    from rich.table import Table

    from archsearch.config import run_param_counts
    from archsearch.space import known_embed_dim, known_vocab_size, load_space

    check_outputs(json_path)
    sp = load_space(space, overrides or [])
    _print_notes(sp)
    E, V = known_embed_dim(sp.data), known_vocab_size(sp.data)
    console.print(f"[green]ok[/green] {space}: study [bold]{sp.study_name}[/bold], sampler {sp.sampler}, "
                  f"objective {', '.join(f'{o.label} ({o.direction})' for o in sp.objectives)}")
    d = sp.data
    console.print(f"data: {d.source} ({d.tokenizer or 'default tokenizer'}), sizes {', '.join(f'{s:,}' for s in d.sizes)} {d.size_unit}; "
                  f"seeds {sp.seeds}; {'auto' if sp.gpus is None else fmt_count(sp.gpus)} GPU / {fmt_count(sp.cpus)} CPU per trial, {sp.max_concurrent} at once")
    rows = []
    table = Table(title=f"configs (E = {E if E else 'unknown until the data is prepared'})")
    multi = len(sp.families) > 1 or sp.base.family != "cvfp"
    for col in ("config", *(("family",) if multi else ()), "L", "C", "k", "other", "phase-1 params", "phase-2 params", "total"):
        table.add_column(col, justify="right" if col not in ("config", "other", "family") else "left")
    for i, (name, params) in enumerate(sp.configs.items()):
        cfg = sp.run_config(params)
        counts = run_param_counts(cfg, E, V or 0) if E else {}
        cvfp = cfg.family == "cvfp"
        other = {k: v for k, v in params.items() if "." in k or (not cvfp and k not in ("family", "num_layers"))}
        rows.append({"name": name, "family": cfg.family, "params": params, **counts})
        if i >= TABLE_ROWS:
            continue
        table.add_row(
            name, *((cfg.family,) if multi else ()), str(getattr(cfg.family_config, "num_layers", "-") if not cvfp else cfg.model.num_layers),
            str(cfg.model.context_dim) if cvfp else "-", str(cfg.model.num_input_tokens) if cvfp else "-",
            ", ".join(f"{k}={v}" for k, v in other.items()),
            fmt_count(counts.get("phase1_params")), fmt_count(counts.get("phase2_params")), fmt_count(counts.get("total_params")),
        )  # fmt: skip
    if sp.configs:
        console.print(table)
        if len(sp.configs) > TABLE_ROWS:
            console.print(f"... and {len(sp.configs) - TABLE_ROWS:,} more configs (all of them in --json)")
    if sp.parameters:
        console.print("searched parameters: " + "; ".join(f"{k}: {v.to_dict()}" for k, v in sp.parameters.items()))
        console.print(f"n_trials: {sp.n_trials} (beyond the {len(sp.configs)} warm-start configs)")
    _write_json(json_path, {"study": sp.study_name, "sampler": sp.sampler, "embed_dim": E, "configs": rows,
                            "objectives": [o.to_dict() for o in sp.objectives],
                            "parameters": {k: v.to_dict() for k, v in sp.parameters.items()}, "notes": sp.notes})


# --------------------------------------------------------------------------- run


@app.command(short_help="Run a study on Ray Tune (configs and/or search trials).")
def run(
    space: Path = SpaceArg,
    overrides: Optional[list[str]] = OverridesArg,
    storage: Optional[str] = typer.Option(None, help="study storage URL (default: the space's, else $ARCHSEARCH_HOME/archsearch.db, ARCHSEARCH_HOME being ./studies unless set)"),
    study: Optional[str] = typer.Option(None, "--study", help="study name (default: the space's study.name)"),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", help="new trials a search adds (default: the space's n_trials)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: an embedded local Ray)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the trials that would run and exit; writes nothing"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no live view"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the run's summary here"),
) -> None:
    """Run a study: every config of the space (and/or new search trials) on Ray Tune.

    Run the same command again to resume: done configs are kept, missing ones queued.
    Exit 0: done; 1: done but some trials failed; 130: interrupted; 2: bad input.

    Examples:

    \b
      archsearch run spaces/quickstart.yaml
      archsearch run spaces/quickstart.yaml phase2.max_epochs=2 --study quick_e2 --dry-run
      archsearch run spaces/tpe_explore.yaml "data.sizes={tokens: [2000, 4000, 8000]}" --n-trials 3 --dry-run
    """
    from archsearch.timing import Laps, process_start

    laps = Laps(start=process_start())  # --json timings: from the process's start, see archsearch.timing
    laps.lap("imports")
    from archsearch.space import load_space

    check_outputs(json_path)
    check_study_name(study)
    sp = load_space(space, overrides or [])
    _print_notes(sp)
    if dry_run:
        _print_dry_run(sp, storage, study, n_trials, json_path)
        return
    from archsearch.search.runner import run_search, stop_embedded_ray

    laps.lap("space")
    summary = run_search(sp, storage=storage, study_name=study, n_trials=n_trials, address=address,
                         view_mode="quiet" if quiet else "auto", laps=laps)  # fmt: skip
    _print_summary(sp, summary)
    laps.lap("summary")
    if not summary.cluster_lost:  # a lost cluster is abandoned below, never waited on
        stop_embedded_ray()
    laps.lap("ray_shutdown")
    _write_json(json_path, summary.to_dict())
    if summary.disk_full:
        err_console.print(f"[bold red]the run stopped[/bold red]: {summary.disk_full}. Its trials failed as disk_full; what "
                          "was written is consistent (SQLite rolls back a write it cannot finish; a trial it could not "
                          "mark stays RUNNING and the next run fails it as stale and queues it again). Free some space "
                          "and run the same command again.", highlight=False)  # fmt: skip
        raise SystemExit(1)
    if summary.cluster_lost:
        err_console.print(f"[bold red]the Ray cluster was lost[/bold red]: {summary.cluster_lost}. The study is consistent: "
                          "its running trials failed as cluster_lost and are queued first for the next run; run the same "
                          "command again to resume.", highlight=False)  # fmt: skip
        from archsearch.search.runner import abandon_ray

        abandon_ray()  # Ray's and Tune's exit handlers would wait a minute on the lost cluster
        raise SystemExit(1)
    if summary.interrupted:
        err_console.print("[yellow]interrupted[/yellow]: the study is consistent; run the same command again to resume "
                          "(unfinished trials are queued first).")
        raise SystemExit(130)
    if summary.failed:
        raise SystemExit(1)


def _print_dry_run(sp, storage, study, n_trials, json_path) -> None:
    from rich.table import Table

    from archsearch.config import run_param_counts
    from archsearch.search.runner import dry_run

    d = dry_run(sp, storage=storage, study_name=study, n_trials=n_trials)
    E = d.embed_dim
    console.print(f"study [bold]{d.study_name}[/bold] on {d.storage}: " + ("exists" if d.exists else "would be created")
                  + (f"; {len(d.done)} config(s) already done" if d.done else "")
                  + (f"; {len(d.stale)} stale RUNNING trial(s) would be failed and retried" if d.stale else ""))  # fmt: skip
    table = Table(title=f"trials that would run: {len(d.to_run)} config(s)" + (f" + {d.n_new} new {sp.sampler} trial(s)" if d.n_new else ""))
    for col in ("config", "params", "sizes", "seeds", "phase-1 params", "phase-2 params", "total params"):
        table.add_column(col)
    sizes = ", ".join(f"{s:,}" for s in sp.data.sizes) + f" {sp.data.size_unit}"
    rows = []
    for i, (name, params) in enumerate(d.to_run):
        counts = run_param_counts(sp.run_config(params), E, d.vocab_size or 0) if E else {}
        rows.append({"name": name, "params": params, **counts})
        if i >= TABLE_ROWS:
            continue
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in params.items()), sizes, str(sp.seeds),
                      fmt_count(counts.get("phase1_params")), fmt_count(counts.get("phase2_params")), fmt_count(counts.get("total_params")))  # fmt: skip
    for i in range(min(d.n_new, TABLE_ROWS)):
        table.add_row(f"new {i + 1}", f"sampled by {sp.sampler} during the run", sizes, str(sp.seeds), "-", "-", "-")
    console.print(table)
    if len(d.to_run) > TABLE_ROWS or d.n_new > TABLE_ROWS:
        console.print(f"(the table shows at most {TABLE_ROWS} configs and {TABLE_ROWS} new trials; --json lists every config)")
    console.print(f"runs: {(len(d.to_run) + d.n_new) * len(sp.data.sizes) * len(sp.seeds)} (config x size x seed), before run-cache hits")
    _write_json(json_path, {"study": d.study_name, "exists": d.exists, "to_run": rows, "done": d.done, "stale": d.stale, "n_new": d.n_new})


def _print_summary(sp, summary) -> None:
    from rich.table import Table

    table = Table(title=f"study {summary.study_name}: this run ({summary.seconds:.0f} s)")
    for col in ("#", "config", "state", *(o.label for o in sp.objectives), "cached"):
        table.add_column(col)
    table.add_column("note", overflow="fold")  # why a trial failed or was pruned, wrapped (not cut mid-word)
    for o in sorted(summary.outcomes, key=lambda o: o.number):
        vals = [f"{v:.4g}" for v in o.values] if o.values else ["-"] * len(sp.objectives)
        reason = o.reason or ""
        table.add_row(str(o.number), o.name, o.state, *vals, "yes" if o.cached else "", reason if len(reason) <= 300 else reason[:299] + "…")
    if summary.outcomes:
        console.print(table)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items()))
    console.print(f"study {summary.study_name} now holds {counts or 'no trials'}"
                  + (f"; {len(summary.failed_stale)} stale trial(s) of a killed run were failed and retried" if summary.failed_stale else ""))
    if summary.repeats:
        console.print(f"{summary.repeats} proposal(s) repeated configs the study already held: answered from it, not run, not counted in --n-trials")
    if summary.exhausted:
        console.print(f"[yellow]{summary.exhausted}[/yellow]")
    console.print(f"view it: archsearch dashboard --storage {summary.storage}")


# --------------------------------------------------------------------------- dashboard, studies


def _existing_storage(storage: str | None):
    """(resolved URL, Optuna storage) of a storage that must exist already (nothing is created)."""
    from archsearch.search.storage import existing_storage

    return existing_storage(storage, "--storage")


def check_port(host: str, port: int) -> None:
    """An invalid, privileged-for-us or busy ``--port`` (or an unknown ``--host``) is a usage
    error before the storage is opened, not a traceback from the web server."""
    import socket

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {shown(host)}: not an address of this machine ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(addr)
        except OSError as e:
            why = "is in use by another program" if e.errno == 98 else (e.strerror or str(e))
            raise ConfigError(f"--port {port} on {host}: {why}; choose another with --port") from None


@app.command()
def dashboard(
    storage: Optional[str] = typer.Option(None, help="study storage URL (default: $ARCHSEARCH_HOME/archsearch.db, ARCHSEARCH_HOME being ./studies unless set)"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (127.0.0.1: this machine only)"),
    port: int = typer.Option(8080, help="port"),
    artifact_dir: Optional[Path] = typer.Option(None, help="trial artifacts (default: beside the storage)"),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", help="also answer requests addressed to this NAME or NAME:PORT (repeatable)"),
    any_host: bool = typer.Option(False, "--any-host", help="answer requests whatever their Host header (no DNS-rebinding protection)"),
) -> None:
    """Serve optuna-dashboard on a study storage (only to requests addressed to it).

    Runs until Ctrl-C. Exit 2: bad option, a port in use, no such storage.

    Examples:

    \b
      archsearch dashboard
      archsearch dashboard --storage sqlite:///docs/quickstart/study.db --port 8081
    """
    from optuna.artifacts import FileSystemArtifactStore

    from archsearch.search import storage as stg
    from archsearch.search.dashboard import serve

    check_port(host, port)
    url, opt_storage = _existing_storage(storage)
    art = artifact_dir or stg.artifact_dir_for(url)
    from archsearch import paths

    why = paths.folder_problem(art)
    if why:
        raise ConfigError(f"--artifact-dir {art}: {why}")
    art.mkdir(parents=True, exist_ok=True)
    err_console.print(f"optuna-dashboard on http://{host}:{port}/ for {stg.mask_url(url)} (artifacts: {art}); Ctrl-C stops it")
    serve(opt_storage, host, port, FileSystemArtifactStore(str(art)), allow=allow_host or (), any_host=any_host)


@app.command(short_help="List the studies of a storage with their best values.")
def studies(
    storage: Optional[str] = typer.Option(None, help="study storage URL (default: $ARCHSEARCH_HOME/archsearch.db, ARCHSEARCH_HOME being ./studies unless set)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the list here"),
) -> None:
    """List the studies of a storage with trial counts and best values.

    Examples:

    \b
      archsearch studies
      archsearch studies --storage sqlite:///docs/tpe_explore/study.db
    """
    from collections import Counter

    import optuna
    from rich.table import Table

    from archsearch.search import storage as stg

    check_outputs(json_path)
    url, opt_storage = _existing_storage(storage)
    table = Table(title=f"studies in {stg.mask_url(url)}")
    for col in ("study", "objectives", "trials", "COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING", "best"):
        table.add_column(col)
    rows = []
    for s in optuna.get_all_study_summaries(opt_storage, include_best_trial=False):
        study = optuna.load_study(study_name=s.study_name, storage=opt_storage)
        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state.name for t in trials)
        labels = study.user_attrs.get("objectives") or [d.name.lower() for d in study.directions]
        best, none_feasible = [], False
        if counts.get("COMPLETE"):
            try:
                chosen = study.best_trials if len(study.directions) > 1 else [study.best_trial]
            except ValueError:  # Optuna 5: every COMPLETE trial of a constrained study is infeasible
                chosen, none_feasible = [], True
            for t in chosen[:3]:
                best.append({"number": t.number, "config": t.user_attrs.get("config_name"), "values": t.values})
        rows.append({"study": s.study_name, "objectives": labels, "trials": len(trials), **counts, "best": best,
                     **({"best_note": "no feasible COMPLETE trial"} if none_feasible else {})})  # fmt: skip
        best_text = "; ".join(f"#{b['number']} {b['config']}: " + ", ".join(f"{v:.4g}" for v in b["values"]) for b in best) or (
            "none feasible" if none_feasible else "-")  # fmt: skip
        table.add_row(s.study_name, ", ".join(labels), str(len(trials)),
                      *(str(counts.get(k, 0)) for k in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")), best_text)  # fmt: skip
    console.print(table)
    _write_json(json_path, rows)


# --------------------------------------------------------------------------- report


@app.command(short_help="Write a study's report and its dashboard views.")
def report(
    storage: Optional[str] = typer.Option(None, help="study storage URL (default: $ARCHSEARCH_HOME/archsearch.db, ARCHSEARCH_HOME being ./studies unless set)"),
    study: Optional[str] = typer.Option(None, "--study", help="study name (default: the only study of the storage)"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: $ARCHSEARCH_HOME/reports/<study>)"),
    compare: Optional[str] = typer.Option(None, help="'reference' (the report's published numbers), a JSON file in that format, or another study's name"),
    top: int = typer.Option(10, help="searches: configs shown in the tables"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the output paths"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write summary.json here"),
) -> None:
    """Write a study's report (report.md, summary.json, runs.csv, plots) and its dashboard views.

    The examples read the quickstart's study (archsearch run spaces/quickstart.yaml).

    Examples:

    \b
      archsearch report --study quickstart
      archsearch report --study quickstart --compare reference
    """
    import optuna

    from archsearch import paths
    from archsearch.report import build_report, publish_to_dashboard, study_report
    from archsearch.report.render import write_report
    from archsearch.report.sources import REFERENCE, from_reference
    from archsearch.search import storage as stg

    check_outputs(json_path, out)
    check_study_name(study)
    if top < 1 or top > 10_000:
        raise ConfigError(f"--top: expected 1 to 10,000 configs, got {top}")
    url, opt_storage = _existing_storage(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(opt_storage, include_best_trial=False)]
    if study is None:
        if len(names) != 1:
            raise ConfigError(f"--study: the storage holds {len(names)} studies ({', '.join(names) or 'none'}); name one")
        study = names[0]
    if study not in names:
        raise ConfigError(f"--study {study!r}: not in {stg.mask_url(url)} (studies: {', '.join(names) or 'none'})")
    folder = out or paths.home() / "reports" / study
    check_outputs(out=folder)
    st_obj = optuna.load_study(study_name=study, storage=opt_storage)
    with err_console.status(f"building the report of {study}", spinner="dots") if not quiet else _nullcontext():
        rep = study_report(st_obj, stg.shown_url(url, storage), top)
        if not rep.configs:
            raise ConfigError(f"study {study!r} has no COMPLETE trial to report on")
        ref, label = None, ""
        if compare:
            if compare == "reference":
                ref_configs, ref_meta = from_reference(REFERENCE)
                ref, label = build_report(ref_configs, meta=ref_meta), "the published report (000_31be7403ba81866a)"
            elif Path(compare).is_file():
                try:
                    ref_configs, ref_meta = from_reference(compare)
                except ConfigError as e:  # too large, not JSON, not of report_000.json's form
                    raise e.with_source(f"--compare {compare}") from None
                ref, label = build_report(ref_configs, meta=ref_meta), compare
            elif compare in names:
                ref, label = study_report(optuna.load_study(study_name=compare, storage=opt_storage), stg.shown_url(url, storage), top), f"study {compare}"
            else:
                raise ConfigError(f"--compare {compare!r}: not 'reference', a file, or a study of this storage")
        written = write_report(rep, folder, st_obj, ref, label)
        publish_to_dashboard(st_obj, rep)
    if quiet:
        for p in written:
            console.print(str(p))
    else:
        console.print((folder / "report.md").read_text().split("## Settings")[0])
        console.print(f"wrote {', '.join(p.name for p in written)} to {folder}; the summary is the study's note in optuna-dashboard")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text((folder / "summary.json").read_text())


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


# --------------------------------------------------------------------------- entry point


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) of the click the app runs on: typer >= 0.26 ships its own copy
    (``typer._click``, with ``Abort`` in ``typer.exceptions``), older typers use click."""
    import importlib

    usage, aborts = [], []
    for name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage += [c for c in (getattr(mod, "ClickException", None),) if c is not None]
        aborts += [c for c in (getattr(mod, "Abort", None),) if c is not None]
    return tuple(usage), tuple(aborts)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name=PROG, standalone_mode=False)
    except UserError as e:
        from rich.markup import escape

        # escaped: bad input may hold "[/x]", which rich would read as markup; not wrapped: a
        # path or URL stays on one line
        err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors (unknown option, bad value, missing argument)
        usage, aborts = _click_errors()
        if isinstance(e, usage):
            e.show()
            sys.exit(2)
        if isinstance(e, aborts):
            sys.exit(130)
        from archsearch.search.storage import damage_in

        damaged = damage_in(e)  # a SQLite study file damaged where the check on open cannot see
        if damaged is not None:
            from rich.markup import escape

            err_console.print(f"[bold red]error:[/bold red] {escape(str(damaged))}", highlight=False, soft_wrap=True)
            sys.exit(damaged.exit_code)
        # a bug's traceback, as Python prints it (exit 1), but with the command line's
        # passwords masked: a driver's error or an Engine's repr may quote a storage URL
        import traceback

        from archsearch.search.storage import redact_command_line

        sys.stderr.write(redact_command_line("".join(traceback.format_exception(e)), list(argv if argv is not None else sys.argv[1:])))
        sys.exit(1)


if __name__ == "__main__":
    main()
