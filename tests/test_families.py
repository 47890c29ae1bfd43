"""Model families: the protocol's conformance for every built-in family (and the example
plug-in), finding families by name / module:attr / path / entry point, their config errors,
and what a family changes in run-cache keys and study signatures."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import textwrap

import pytest
import torch

from archsearch.config import RunConfig, run_config_from_dict, run_param_counts
from archsearch.errors import ConfigError
from archsearch.families import FamilyError, RunData, config_from_dict, get_family, known_families
from archsearch.families import gpt as G

E, V = 8, 300


def _tiny_cfg(family: str):
    """A config of each family small enough to train in a second on a CPU."""
    if family == "cvfp":
        return run_config_from_dict({"model": {"num_layers": 2, "context_dim": 8, "num_input_tokens": 2},
                                     "phase1": {"batch_size": 200, "max_iterations": 6}, "phase2": {"batch_size": 64, "max_epochs": 2}})  # fmt: skip
    if family == "gpt":
        return run_config_from_dict({"model": {"family": "gpt", "num_layers": 2, "d_model": 16, "n_heads": 2, "context_length": 16,
                                               "batch_size": 8, "max_epochs": 2, "dropout": 0.1}})  # fmt: skip
    return run_config_from_dict({"model": {"family": family, "hidden": 8, "context_length": 16, "max_epochs": 2}})


def _modules(family: str, cfg: RunConfig, W: torch.Tensor) -> list[torch.nn.Module]:
    """The modules a run of ``family`` trains, built as the family builds them."""
    if family == "cvfp":
        from archsearch.cvfp.model import ContextBlock, TokenBlock

        return [ContextBlock(cfg.model, E), TokenBlock(cfg.model, E)]
    if family == "gpt":
        return [G.build(cfg.custom, W)]
    from examples.lstm_family import _model

    return [_model(cfg.custom, W)]


def _trainable(modules) -> int:
    seen = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}
    return sum(p.numel() for p in seen.values())


@pytest.fixture(scope="module")
def streams():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, E, generator=g)
    # a stream with structure (a noisy cycle), so that training has something to learn
    base = torch.arange(1200) % 37
    train = torch.where(torch.rand(1200, generator=g) < 0.2, torch.randint(0, V, (1200,), generator=g), base)
    val = torch.where(torch.rand(200, generator=g) < 0.2, torch.randint(0, V, (200,), generator=g), torch.arange(200) % 37)
    return W, train, val


FAMILIES = ["cvfp", "gpt", "examples.lstm_family:family"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_tiny_config_deterministically_with_finite_metrics(family, streams):
    W, train, val = streams
    cfg = _tiny_cfg(family)
    fam = cfg.family_object()
    data = RunData(W, train, val)
    a = fam.train(cfg.family_config, data, 3, "cpu", None)
    b = fam.train(cfg.family_config, data, 3, "cpu", None)
    c = fam.train(cfg.family_config, data, 4, "cpu", None)
    assert a.family == fam.name and a.train_tokens == len(train) and a.val_tokens == len(val)
    assert math.isfinite(a.val_loss) and a.val_ppl == pytest.approx(math.exp(a.val_loss)) and 0 <= a.val_acc <= 1
    assert math.isfinite(a.val_loss_se) and a.val_loss_se > 0
    assert all(math.isfinite(v) and v >= 0 for v in a.phase_seconds.values()) and a.phase_seconds
    assert all(math.isfinite(float(v)) for v in a.metrics.values())
    assert set(a.capped) <= {"phase1_max_iterations", "max_epochs"}
    assert (a.val_loss, a.val_acc, a.metrics) == (b.val_loss, b.val_acc, b.metrics | {k: a.metrics[k] for k in a.metrics if "per_s" in k or "us" in k})
    assert c.val_loss != a.val_loss
    # parameter counts: the config alone gives what the modules hold, and the run records them
    counts = fam.param_counts(cfg.family_config, E, V)
    assert counts["total"] == _trainable(_modules(family, cfg, W)) == a.params["total"] == run_param_counts(cfg, E, V)["total_params"]
    json.dumps(a.to_dict())  # crosses process borders and the run cache as JSON


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("d_model", [0, 12])
def test_gpt_counts_match_modules_for_every_embedding_and_width_setting(flags, d_model):
    cfg = config_from_dict(G.GPTConfig, {"num_layers": 2, "d_model": d_model, "n_heads": 2, "context_length": 8, "mlp_ratio": 1.5,
                                         "train_embedding": flags[0], "train_head": flags[1]})  # fmt: skip
    W = torch.randn(V, E)
    model = G.build(cfg, W)
    assert G.param_counts(cfg, E, V)["total"] == G.trainable_params(model)
    assert (model.inp is None) == (d_model in (0, E))
    assert (model.head is model.wte) == all(flags)  # both trainable: one tied matrix


@pytest.mark.parametrize("M,T,stride", [(200, 16, 8), (10, 16, 8), (101, 7, 3), (50, 8, 8), (3, 2, 1)])
def test_gpt_validation_windows_score_every_cvfp_target_once(M, T, stride):
    windows = G.eval_windows(M, T, stride)
    scored = [p for s, e, first in windows for p in range(first, e)]
    assert scored == list(range(M - 1))  # targets 1..M-1, as CVFP's validation pass predicts
    assert all(e - s <= T for s, e, _ in windows)
    assert all(first - s >= T - stride for s, _e, first in windows[1:])  # later targets keep context


@pytest.mark.parametrize("N,T", [(100, 16), (17, 16), (10, 16), (65, 16)])
def test_gpt_training_windows_cover_every_target(N, T):
    starts, L = G.train_windows(N, T)
    covered = {p for s in starts for p in range(s, s + L)}
    assert covered == set(range(N - 1)) and all(s + L <= N - 1 for s in starts)


def test_cvfp_config_and_keys_are_unchanged_by_families():
    """A CVFP config without a family key keeps its dict, run-cache key and study signature."""
    from archsearch.search.study import signature
    from archsearch.space import load_space

    cfg = run_config_from_dict({"model": {"num_layers": 3, "context_dim": 16}, "phase1": {"lr": 1e-3}})
    old = {s: dataclasses.asdict(getattr(cfg, s)) for s in ("model", "phase1", "phase2", "engine")}
    assert cfg.to_dict() == old
    old_key = dict(old, engine={"precision": cfg.engine.precision, "er_max_rows": cfg.engine.er_max_rows})
    assert cfg.key() == hashlib.sha256(json.dumps(old_key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert run_config_from_dict({"model": {"family": "cvfp", "num_layers": 3, "context_dim": 16}, "phase1": {"lr": 1e-3}}).key() == cfg.key()
    sp = load_space("spaces/grid_4arch_offline.yaml")
    assert signature(sp)["base"] == RunConfig().to_dict() | {"engine": {"precision": "auto"}}


def test_family_and_its_config_are_in_keys_and_signatures(tmp_path):
    from archsearch.search.study import signature, signature_hash
    from archsearch.space import parse_space

    g = run_config_from_dict({"model": {"family": "gpt", "num_layers": 2}})
    assert g.key() != RunConfig().key()
    assert g.key() != g.replace(d_model=32).key() and g.key() == g.replace(num_layers=2).key()
    data = {"source": "wiki", "sizes": {"tokens": [1000, 2000]}}
    sig = lambda model: signature_hash(signature(parse_space({"data": data, "model": model})))  # noqa: E731
    assert len({sig({}), sig({"family": "gpt"}), sig({"family": "gpt", "lr": 0.01})}) == 3
    assert sig({}) == sig({"family": "cvfp"})
    assert signature(parse_space({"data": data, "model": {"family": "gpt"}}))["base"]["model"]["family"] == "gpt"


def test_switching_family_uses_that_familys_settings_and_skips_other_fields():
    base = run_config_from_dict({"model": {"num_layers": 2, "context_dim": 8, "gpt": {"d_model": 16, "n_heads": 2}}})
    g = base.replace(family="gpt", num_layers=1, context_dim=32)  # context_dim is CVFP's: not gpt's
    assert g.family == "gpt" and (g.custom.num_layers, g.custom.d_model, g.custom.n_heads) == (1, 16, 2)
    back = g.replace(family="cvfp", d_model=64)
    assert back.family == "cvfp" and (back.model.num_layers, back.model.context_dim) == (2, 8)
    assert back.others["gpt"]["d_model"] == 16


# --------------------------------------------------------------------------- finding families


def test_builtin_and_plugin_families_are_found(tmp_path, monkeypatch):
    assert known_families()[:2] == ["cvfp", "gpt"]
    assert get_family("gpt").name == "gpt"
    assert get_family("examples.lstm_family:family").name == "lstm"
    assert get_family("examples/lstm_family.py:family").name == "lstm"


def test_a_module_family_is_found_in_the_current_directory_without_it_on_the_path(tmp_path, monkeypatch):
    """The ``archsearch`` console script, unlike ``python -m``, has no current directory on
    sys.path; README: ``archsearch run examples/lstm_space.yaml`` works from the repository
    root. A package:module of the current directory is found there (at the path's end)."""
    from pathlib import Path

    package = tmp_path / "myfams_here"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lstm.py").write_text((Path(__file__).parents[1] / "examples" / "lstm_family.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert get_family("myfams_here.lstm:family").name == "lstm"
    assert sys.path[-1] == str(tmp_path)
    with pytest.raises(FamilyError, match="no module named 'nosuch_family_pkg'"):  # still named when it is nowhere
        get_family("nosuch_family_pkg.x:family")


def test_entry_point_family(tmp_path, monkeypatch):
    """A distribution that declares ``archsearch.families`` makes its family known by name."""
    (tmp_path / "myfam.py").write_text("from examples.lstm_family import family\n")
    dist = tmp_path / "myfam-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myfam\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[archsearch.families]\nmylstm = myfam:family\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "mylstm" in known_families()
    cfg = run_config_from_dict({"model": {"family": "mylstm", "hidden": 4}})
    assert cfg.family_object().name == "lstm" and cfg.custom.hidden == 4


def test_unknown_family_names_the_known_ones():
    with pytest.raises(FamilyError, match=r"unknown family 'transformerx' \(known: cvfp, gpt"):
        get_family("transformerx")


def test_family_config_errors_are_listed_with_their_keys():
    with pytest.raises(ConfigError) as e:
        run_config_from_dict({"model": {"family": "gpt", "num_layers": 0, "d_model": 10, "n_heads": 3, "mlp_ratio": "x", "size": 3,
                                        "context_length": 10**6}, "phase1": {"lr": -1}})  # fmt: skip
    p = e.value.problems
    assert any(x.startswith("model.num_layers: must be >= 1") for x in p)
    assert any(x.startswith("model.mlp_ratio: expected a finite number") for x in p)
    assert any(x.startswith("model.size: unknown field") for x in p)
    assert any(x.startswith("model.context_length: must be <= 8,192") for x in p)  # bounded before anything is allocated
    assert any(x.startswith("phase1.lr") for x in p)
    with pytest.raises(ConfigError, match=r"model.n_heads: 3 does not divide d_model \(10\)"):
        run_config_from_dict({"model": {"family": "gpt", "d_model": 10, "n_heads": 3}})


def _write_module(tmp_path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return f"{name}:family"


def test_user_family_that_raises_on_import_or_breaks_the_protocol_is_named(tmp_path, monkeypatch):
    spec = _write_module(tmp_path, monkeypatch, "fam_raises", "raise RuntimeError('boom at import')\n")
    with pytest.raises(FamilyError, match=r"'fam_raises:family' raised on import: RuntimeError: boom at import"):
        get_family(spec)
    spec = _write_module(tmp_path, monkeypatch, "fam_broken", """
        from dataclasses import dataclass
        @dataclass
        class C:
            width: int
            data: list = None
        class family:
            name = "broken one"
            config = C
            param_counts = None
    """)
    with pytest.raises(FamilyError) as e:
        get_family(spec)
    text = str(e.value)
    for part in ("name must be", "'width' has no default", "'data' has type", "param_counts must be callable", "train must be callable"):
        assert part in text, text
    assert "fam_broken:family" in text
    with pytest.raises(FamilyError, match="has no attribute 'nope'"):
        get_family("examples.lstm_family:nope")
    with pytest.raises(FamilyError, match="no module named 'not_a_module'"):
        get_family("not_a_module:family")


def test_gpt_learns_a_deterministic_chain():
    """Next-token training, causal attention and the tied head fit together: on a stream where
    each token has one successor, validation PPL goes to 1 (untrained: about V)."""
    g = torch.Generator().manual_seed(0)
    Vs, Es = 64, 16
    W = torch.randn(Vs, Es, generator=g)
    succ = torch.randperm(Vs, generator=g)

    def stream(n, t):
        out = []
        for _ in range(n):
            t = int(succ[t])
            out.append(t)
        return torch.tensor(out)

    train = stream(3000, 0)
    val = stream(300, int(train[-1]))  # the same cycle of the permutation, later
    cfg = run_config_from_dict({"model": {"family": "gpt", "num_layers": 1, "d_model": 32, "n_heads": 2, "context_length": 16,
                                          "lr": 1e-2, "batch_size": 8, "max_epochs": 3}})  # fmt: skip
    r = cfg.family_object().train(cfg.custom, RunData(W, train, val), 1, "cpu", None)
    assert r.val_ppl < 1.1 and r.val_acc > 0.99


def test_cvfp_only_objectives_are_refused_for_other_families():
    from archsearch.space import parse_space

    data = {"source": "wiki", "sizes": {"tokens": [1000, 2000]}}
    with pytest.raises(ConfigError, match="objective: val_er is a CVFP number, which this space's gpt family does not report"):
        parse_space({"data": data, "model": {"gpt": {"d_model": 16}}, "objective": "val_er",
                     "sampler": {"type": "grid", "configs": {"g": {"family": "gpt"}}}})  # fmt: skip
    assert parse_space({"data": data, "objective": "val_er"}).objectives[0].name == "val_er"


def test_run_key_of_cvfp_is_unchanged_and_other_families_ignore_the_engine_version(monkeypatch):
    import archsearch.runcache as rc

    cvfp, g = RunConfig(), run_config_from_dict({"model": {"family": "gpt"}})
    blob = json.dumps({"config": cvfp.key(), "data": "fp", "seed": 1, "engine": rc.ENGINE_VERSION, "record": rc.RECORD_VERSION}, sort_keys=True)
    assert rc.run_key(cvfp, "fp", 1) == hashlib.sha256(blob.encode()).hexdigest()
    before = (rc.run_key(cvfp, "fp", 1), rc.run_key(g, "fp", 1))
    monkeypatch.setattr(rc, "ENGINE_VERSION", rc.ENGINE_VERSION + 1)
    assert rc.run_key(cvfp, "fp", 1) != before[0] and rc.run_key(g, "fp", 1) == before[1]
    assert rc.run_key(g, "fp", 2) != before[1] and rc.run_key(g, "other", 1) != before[1]


def test_report_puts_families_side_by_side_at_matched_parameters():
    from archsearch.report.data import ConfigResult, SizeRow, build_report
    from archsearch.report.render import markdown, summary_note

    def cfg(name, family, params, a, alpha):
        sizes = [SizeRow(tokens=t, ppl=a * t**alpha * (1 + 0.01 * ((i % 2) - 0.5))) for i, t in enumerate((1000, 2000, 4000, 8000))]
        return ConfigResult(name=name, params={}, phase1_params=None, sizes=sizes, family=family, total_params=params)

    configs = [cfg("c1", "cvfp", 1_000_000, 900, -0.2), cfg("g1", "gpt", 1_020_000, 1500, -0.3), cfg("g2", "gpt", 5_000_000, 1400, -0.3)]
    rep = build_report(configs)
    assert [(r["family"], r["config"]) for r in rep.families] == [("cvfp", "c1"), ("gpt", "g1"), ("gpt", "g2")]
    assert all(r["alpha_low"] < r["alpha"] < r["alpha_high"] for r in rep.families)
    (m,) = rep.matched  # g2 is 5x larger: no match
    assert (m["a"]["config"], m["b"]["config"]) == ("c1", "g1") and m["d_alpha"] == pytest.approx(0.1, abs=0.01)
    md = markdown(rep)
    assert "## By family" in md and "| cvfp | c1 | 1.00M |" in md and "| gpt | g1 | 1.02M |" in md
    assert "## By family" in summary_note(rep)  # the dashboard's study note carries it
    assert "## By family" not in markdown(build_report([cfg("c1", "cvfp", 1_000_000, 900, -0.2)]))  # CVFP-only: as before


def test_queued_configs_record_only_their_own_familys_fields():
    from archsearch.search.distributions import full_params, search_distributions
    from archsearch.space import load_space

    sp = load_space("spaces/cvfp_vs_gpt_offline.yaml")
    full = {n: full_params(sp, p) for n, p in sp.configs.items()}
    assert full["gpt_1.2M"] == {"num_layers": 1, "family": "gpt", "mlp_ratio": 1.67}
    assert full["cvfp_1.2M"] == {"num_layers": 2, "context_dim": 384, "num_input_tokens": 1, "family": "cvfp"}
    dists = search_distributions(sp)
    assert set(dists["family"].choices) == {"cvfp", "gpt"}
    assert (dists["mlp_ratio"].low, dists["mlp_ratio"].high) == (1.67, 4.67)  # spans the gpt configs' values only
