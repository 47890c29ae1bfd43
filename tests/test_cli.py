"""The CLI as a user runs it: validate, fit, trial (subprocesses, real files); its conventions
(-h, --version, shell completion, flags, the examples of --help) and what overrides mean."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import version

import pytest
from helpers import ROOT, cli, write_space

SPACES = sorted((ROOT / "spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_passes_validate(path, tmp_path):
    r = cli("validate", str(path), "--json", str(tmp_path / "v.json"), env={"ARCHSEARCH_HOME": str(tmp_path / "h")})
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
    assert not (tmp_path / "h").exists()  # validate writes nothing


def test_validate_gives_the_report_phase1_counts_without_download(tmp_path):
    r = cli("validate", "spaces/grid_4arch.yaml", "--json", str(tmp_path / "v.json"), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "v.json").read_text())
    assert out["embed_dim"] == 768
    assert {c["name"]: round(c["phase1_params"] / 1e6, 2) for c in out["configs"]} == {
        "baseline": 7.09, "input_tokens_2": 10.63, "context_dim_1152": 13.29, "layers_9": 10.64,
    }  # fmt: skip
    assert "7.09M" in r.stdout and "13.29M" in r.stdout


def test_validate_reports_every_problem_and_exits_2(tmp_path):
    bad = write_space(tmp_path / "bad.yaml", {
        "model": {"num_layers": 0, "num_input_tokens": 0},
        "sampler": {"type": "grid", "configs": {"x": {"context_dim": -4}}},
        "data": {"source": "wiki", "sizes": {"tokens": [1000]}},
    })  # fmt: skip
    r = cli("validate", str(bad))
    assert r.returncode == 2
    for needle in ("model.num_layers", "model.num_input_tokens", "sampler.configs.x", "data.sizes"):
        assert needle in r.stderr, (needle, r.stderr)
    assert "Traceback" not in r.stderr


def test_overrides_apply_on_the_command_line(tmp_path):
    r = cli("validate", "spaces/grid_4arch.yaml", "sampler.configs.baseline.num_layers=3", "--json", str(tmp_path / "v.json"))
    assert r.returncode == 0, r.stderr
    configs = {c["name"]: c for c in json.loads((tmp_path / "v.json").read_text())["configs"]}
    assert configs["baseline"]["params"]["num_layers"] == 3
    r = cli("validate", "spaces/grid_4arch.yaml", "model.num_layer=3")
    assert r.returncode == 2 and "model.num_layer" in r.stderr


def test_a_run_field_override_replaces_the_configs_value_and_says_so(tmp_path):
    """model.num_layers=3 on a grid whose every config sets num_layers: every trial gets 3
    layers (the configs' own values are replaced, each replacement is a note); layers_3 is then
    baseline's twin and runs once. validate and run --dry-run agree."""
    env = {"ARCHSEARCH_HOME": str(tmp_path / "home")}
    r = cli("validate", "spaces/quickstart.yaml", "model.num_layers=3", "--json", str(tmp_path / "v.json"), env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "v.json").read_text())
    params = {c["name"]: c["params"] for c in out["configs"]}
    assert params == {
        "baseline": {"num_layers": 3, "context_dim": 64, "num_input_tokens": 1},
        "input_tokens_2": {"num_layers": 3, "context_dim": 64, "num_input_tokens": 2},
        "context_dim_96": {"num_layers": 3, "context_dim": 96, "num_input_tokens": 1},
    }
    assert out["notes"] == [
        "model.num_layers=3: replaces the value of sampler.configs baseline (2), input_tokens_2 (2), context_dim_96 (2)",
        "model.num_layers=3: sampler.configs.layers_3 is now the same as baseline; it runs once, as baseline",
    ]
    for note in out["notes"]:
        assert f"note: {note}" in " ".join(r.stderr.split()), r.stderr
    r = cli("run", "spaces/quickstart.yaml", "model.num_layers=3", "--dry-run", "--json", str(tmp_path / "d.json"), env=env)
    assert r.returncode == 0, r.stderr
    assert {c["name"]: c["params"] for c in json.loads((tmp_path / "d.json").read_text())["to_run"]} == params
    assert "note: model.num_layers=3: replaces" in r.stderr
    assert not (tmp_path / "home" / "archsearch.db").exists()  # a dry run writes nothing


def test_an_override_naming_a_config_the_space_lacks_adds_it_with_a_note(tmp_path):
    """README: "override it by name: sampler.configs.baseline.num_layers=3". A misspelt name
    adds a config with the base values for the rest (here C = 768): never silently."""
    r = cli("validate", "spaces/quickstart.yaml", "sampler.configs.baselin.num_layers=3", "sampler.configs.baseline.context_dim=32",
            "--json", str(tmp_path / "v.json"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "v.json").read_text())
    params = {c["name"]: c["params"] for c in out["configs"]}
    assert params["baselin"] == {"num_layers": 3} and params["baseline"]["context_dim"] == 32
    note = ("sampler.configs.baselin.num_layers: adds the config baselin to sampler.configs (the space file names baseline, "
            "input_tokens_2, context_dim_96, layers_3); its other fields keep the base values")  # fmt: skip
    assert out["notes"] == [note]  # the existing config's override is no news
    assert f"note: {note}" in " ".join(r.stderr.split()), r.stderr


def test_a_run_field_override_fixes_a_searched_field(tmp_path):
    r = cli("validate", "spaces/tpe_explore.yaml", "model.num_input_tokens=2", "--json", str(tmp_path / "v.json"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "v.json").read_text())
    assert sorted(out["parameters"]) == ["context_dim", "num_layers"]  # no longer searched
    warm = {c["name"]: c for c in out["configs"]}
    assert sorted(warm) == ["baseline", "context_dim_1152", "layers_9"]  # input_tokens_2 = baseline now
    assert all(c["params"].keys() == {"num_layers", "context_dim"} for c in warm.values())
    # the counts are those of k = 2 (the base value), e.g. baseline = the report's input_tokens_2
    assert warm["baseline"]["phase1_params"] == json.loads(cli_json(tmp_path, "spaces/tpe_explore.yaml"))["input_tokens_2"]
    assert "fixes num_input_tokens for every trial" in r.stderr


def cli_json(tmp_path, space) -> str:
    r = cli("validate", space, "--json", str(tmp_path / "plain.json"))
    assert r.returncode == 0, r.stderr
    return json.dumps({c["name"]: c["phase1_params"] for c in json.loads((tmp_path / "plain.json").read_text())["configs"]})


@pytest.mark.parametrize("override", ["model.num_layers=3", "model={num_layers: 3}"])
def test_run_field_overrides_on_a_cartesian_grid_and_list_configs(tmp_path, override):
    from archsearch.space import load_space

    data = {"source": "wiki", "sizes": {"tokens": [1000, 2000]}}
    grid = write_space(tmp_path / "g.yaml", {"parameters": {"num_layers": [1, 2], "context_dim": [8, 16]}, "data": data})
    sp = load_space(grid, [override])
    assert list(sp.configs.values()) == [{"context_dim": 8}, {"context_dim": 16}]  # the product lost its num_layers axis
    assert sp.base.model.num_layers == 3 and sp.notes == [f"model.num_layers=3: fixes num_layers for every trial "
                                                          "(parameters.num_layers no longer searches it)"]  # fmt: skip
    listed = write_space(tmp_path / "l.yaml", {"sampler": {"type": "grid", "configs": [
        {"name": "a", "num_layers": 1, "context_dim": 8}, {"name": "b", "model.num_layers": 2, "context_dim": 16}]}, "data": data})  # fmt: skip
    sp = load_space(listed, [override])
    assert sp.configs == {"a": {"num_layers": 3, "context_dim": 8}, "b": {"num_layers": 3, "context_dim": 16}}
    assert sp.notes == ["model.num_layers=3: replaces the value of sampler.configs a (1), b (2)"] and sp.merged == {}


def test_an_override_that_sets_no_field_is_an_error_not_a_note(tmp_path):
    r = cli("run", "spaces/quickstart.yaml", "phase2.max_epoch=2", "--dry-run", env={"ARCHSEARCH_HOME": str(tmp_path / "h")})
    assert r.returncode == 2 and "phase2.max_epoch" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "h").exists()


# --------------------------------------------------------------------------- conventions

COMMANDS = ("trial", "fit", "validate", "run", "dashboard", "studies", "report")


def _help(*args: str) -> str:
    r = cli(*args, "--help")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_h_is_help_and_flags_render_as_flags(command):
    args = (command,) if command else ()
    r = cli(*args, "-h")
    assert r.returncode == 0, r.stderr
    assert r.stdout == _help(*args) and r.stdout.startswith(f"Usage: archsearch {command}".rstrip())
    assert "<bool>" not in r.stdout and "-h, --help" in r.stdout
    options = r.stdout.split("Options:")[1]
    for flag in ("--dry-run", "--quiet", "--no-cache", "--version"):
        for line in options.splitlines():
            if re.match(rf"\s+(-\w, )?{flag}\b", line):  # the option's row: its help text follows, no value
                assert re.match(rf"\s+(-\w, )?{flag}\s{{2,}}\w", line), line


def test_version_is_the_installed_distribution_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"archsearch {version('archsearch')}"


def test_shell_completion_installs_and_completes_in_bash(tmp_path):
    """--install-completion writes the bash script and sources it from ~/.bashrc; bash, with
    that script, completes commands and options by asking archsearch itself."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "archsearch").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m archsearch.cli "$@"\n')
    (bindir / "archsearch").chmod(0o755)
    env = dict(os.environ, HOME=str(tmp_path), PATH=f"{bindir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), SHELL="/bin/bash")

    def bash(script: str) -> str:
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = bash("archsearch --install-completion; true")  # '; true': bash stays the parent shell
    script = tmp_path / ".bash_completions" / "archsearch.sh"
    assert "bash completion installed" in out and script.is_file()
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()
    assert "_ARCHSEARCH_COMPLETE" in bash("archsearch --show-completion; true")

    def complete(*words: str) -> list[str]:
        quoted = " ".join(shlex.quote(w) for w in ("archsearch", *words))
        got = bash(f"source {shlex.quote(str(script))}; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
                   '_archsearch_completion archsearch; printf "%s\\n" "${COMPREPLY[@]}"')  # fmt: skip
        return got.split()

    assert complete("ru") == ["run"]
    assert "report" in complete("re")
    assert complete("run", "--dr") == ["--dry-run"]
    assert complete("trial", "--no-") == ["--no-cache"]


def _examples(command: str) -> list[list[str]]:
    """The example command lines of a command's --help."""
    text = _help(command)
    assert "Examples:" in text, f"{command} --help shows no example"
    return [shlex.split(line.strip())[1:] for line in text.split("Examples:")[1].splitlines() if line.strip().startswith("archsearch ")]


@pytest.mark.parametrize("command", ("validate", "run", "fit"))
def test_the_examples_in_help_work(command, tmp_path):
    """Each example runs as printed from the repository root (run's with --dry-run added
    where it trains: the full runs are the quickstart's and the slow tests')."""
    examples = _examples(command)
    assert len(examples) >= 1
    env = {"ARCHSEARCH_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    for args in examples:
        assert args[0] == command
        if command == "run" and "--dry-run" not in args:
            args = [*args, "--dry-run"]
        r = cli(*args, env=env)
        assert r.returncode == 0, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "home" / "archsearch.db").exists()


def test_the_examples_in_help_of_studies_report_and_dashboard_work(tmp_path):
    """studies, report and dashboard show examples that run as printed from the repository
    root once the quickstart has run (its study: docs/quickstart's copy in a fresh home; the
    dashboard on a free port); the shipped example studies they read are left unchanged."""
    import hashlib
    import shutil
    import time
    import urllib.request

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "docs" / "quickstart" / "study.db", home / "archsearch.db")
    env = {"ARCHSEARCH_HOME": str(home)}
    shipped = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (ROOT / "docs").glob("*/study.db")}
    for command in ("studies", "report"):
        examples = _examples(command)
        assert len(examples) >= 2
        for args in examples:
            assert args[0] == command
            r = cli(*args, env=env)
            assert r.returncode == 0, (args, r.stderr)
            assert "Traceback" not in r.stderr
    assert (home / "reports" / "quickstart" / "report.md").is_file()
    examples = _examples("dashboard")
    assert len(examples) >= 2
    for args in examples:
        import socket

        with socket.socket() as sock:  # a free port in place of the printed one (8080 may be taken here)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        args = [*args[: args.index("--port")], *args[args.index("--port") + 2 :]] if "--port" in args else args
        args = [*args, "--port", str(port)]
        proc = subprocess.Popen([sys.executable, "-m", "archsearch.cli", *args], cwd=ROOT, env=dict(os.environ, **env),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            for _ in range(300):
                try:
                    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read()
                    break
                except OSError:
                    assert proc.poll() is None, (args, proc.stderr.read().decode())
                    time.sleep(0.2)
            assert b"quickstart" in page, args
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in shipped} == shipped


@pytest.mark.slow
def test_the_trial_examples_in_help_work(tmp_path):
    for args in _examples("trial"):
        r = cli(*args, "--device", "cpu", "--quiet", env={"ARCHSEARCH_HOME": str(tmp_path / "home")})
        assert r.returncode == 0, (args, r.stderr)
        assert "scaling law: PPL =" in r.stdout


def test_fit_command(tmp_path):
    csv = tmp_path / "fit.csv"
    csv.write_text("tokens,ppl\n62891,751.4\n122795,489.8\n240132,364.6\n587970,249.3\n")
    r = cli("fit", str(csv), "--target-tokens", "1e7", "--json", str(tmp_path / "f.json"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "f.json").read_text())
    assert out["alpha"] == pytest.approx(-0.4860, abs=2e-4) and out["r2"] == pytest.approx(0.9895, abs=2e-4)
    assert out["alpha_low"] < out["alpha"] < out["alpha_high"]
    assert out["ppl_at_target_low"] < out["ppl_at_target"] < out["ppl_at_target_high"]
    assert "alpha = -0.4859" in r.stdout


@pytest.mark.parametrize("text, needle", [
    ("tokens,ppl\n1000,10\n", "at least two sizes"),
    ("tokens,loss\n1000,10\n2000,8\n", "missing column(s) ppl"),
    ("tokens,ppl\n1000,ten\n2000,8\n", "not a number"),
    ("tokens,ppl\n1000,10\n1000,8\n", "duplicate sizes"),
])  # fmt: skip
def test_fit_bad_input_exits_2(tmp_path, text, needle):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    r = cli("fit", str(csv))
    assert r.returncode == 2 and needle in r.stderr, r.stderr


TINY = ["model.num_layers=1", "model.context_dim=8", "data.sizes={tokens: [300, 600, 900]}", "data.val_tokens=300",
        "phase1.batch_size=200", "phase2.batch_size=128", "phase2.max_epochs=1"]  # fmt: skip


def test_trial_end_to_end_on_wiki_and_deterministic(tmp_path):
    env = {"ARCHSEARCH_HOME": str(tmp_path / "home")}
    r = cli("trial", "spaces/quickstart.yaml", *TINY, "--device", "cpu", "--json", str(tmp_path / "a.json"), env=env)
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["name"] == "baseline" and a["params"]["num_layers"] == 1 and a["params"]["context_dim"] == 8
    # overrides mean the same in trial and validate: the trial is validate's first config
    v = cli("validate", "spaces/quickstart.yaml", *TINY, "--json", str(tmp_path / "v.json"), env=env)
    assert a["params"] == json.loads((tmp_path / "v.json").read_text())["configs"][0]["params"]
    assert "note: model.context_dim=8: replaces" in r.stderr and "note: model.context_dim=8: replaces" in v.stderr
    assert [s["train_tokens"] for s in a["sizes"]] == [300, 600, 900]
    assert all(s["val_tokens"] == 300 and s["device"] == "cpu" for s in a["sizes"])
    assert a["fit"]["n_sizes"] == 3 and a["objectives"]["alpha"] == a["fit"]["alpha"]
    assert "scaling law: PPL =" in r.stdout and "Val PPL" in r.stdout
    # a second process, run cache off: the same seed gives identical metrics
    r = cli("trial", "spaces/quickstart.yaml", *TINY, "--device", "cpu", "--no-cache", "--json", str(tmp_path / "b.json"), env=env)
    assert r.returncode == 0, r.stderr
    b = json.loads((tmp_path / "b.json").read_text())
    numbers = lambda s: (s["val_ppl"], s["val_loss"], s["val_loss_se"], s["val_acc"], s["metrics"]["train_er"], s["metrics"]["val_er"],
                         s["metrics"]["phase1_iterations"], s["metrics"]["phase2_best_epoch"])  # fmt: skip
    assert [numbers(s) for s in a["sizes"]] == [numbers(s) for s in b["sizes"]]
    assert not any(s["cached"] for s in b["sizes"])
    # and with the cache on, a third run trains nothing
    r = cli("trial", "spaces/quickstart.yaml", *TINY, "--device", "cpu", "--json", str(tmp_path / "c.json"), env=env)
    c = json.loads((tmp_path / "c.json").read_text())
    assert all(s["cached"] for s in c["sizes"]) and c["fit"]["alpha"] == a["fit"]["alpha"]


def test_trial_picks_a_named_config(tmp_path):
    env = {"ARCHSEARCH_HOME": str(tmp_path / "home")}
    r = cli("trial", "spaces/quickstart.yaml", *TINY, "--config", "nope", env=env)
    assert r.returncode == 2 and "nope" in r.stderr


def test_the_run_summary_shows_a_trial_s_whole_reason():
    """The summary's note column carries why a trial failed: wrapped, not cut at 60 characters
    mid-word ('queued again for the next ru')."""
    from types import SimpleNamespace

    from archsearch.cli import _print_summary
    from archsearch.console import console
    from archsearch.search.runner import RunSummary
    from archsearch.space import load_space

    reason = "interrupted before it finished; queued again for the next run"
    outcome = SimpleNamespace(number=1, name="input_tokens_2", state="FAIL", values=None, cached=False, reason=reason)
    summary = RunSummary(study_name="s", storage="sqlite:///x.db", outcomes=[outcome], counts={"FAIL": 1})
    with console.capture() as cap:
        _print_summary(load_space(ROOT / "spaces" / "quickstart.yaml"), summary)
    assert reason in " ".join(w.strip("│ ") for w in cap.get().split())
