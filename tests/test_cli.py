"""The CLI as a user runs it: validate, fit, trial (subprocesses, real files)."""

from __future__ import annotations

import json

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
