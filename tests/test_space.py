"""Space files: shipped ones validate; bad ones name every problem; overrides work."""

from pathlib import Path

import pytest

from archsearch.errors import ConfigError
from archsearch.space import apply_overrides, load_space, parse_space

SPACES = sorted((Path(__file__).parent.parent / "spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_space_files_validate(path):
    sp = load_space(path)
    assert sp.configs or sp.parameters
    assert path.read_text().lstrip().startswith("#")
    assert f"archsearch run spaces/{path.name}" in path.read_text()  # each opens with its command


def test_grid_4arch_is_the_report_grid():
    sp = load_space(Path(__file__).parent.parent / "spaces" / "grid_4arch.yaml")
    assert sp.data.source == "ultrachat"
    assert sp.data.size_unit == "samples" and sp.data.sizes == [50, 100, 200, 500]
    assert sp.configs == {
        "baseline": {"num_layers": 6, "context_dim": 768, "num_input_tokens": 1},
        "input_tokens_2": {"num_layers": 6, "context_dim": 768, "num_input_tokens": 2},
        "context_dim_1152": {"num_layers": 6, "context_dim": 1152, "num_input_tokens": 1},
        "layers_9": {"num_layers": 9, "context_dim": 768, "num_input_tokens": 1},
    }
    assert sp.base.phase1.lr == 0.002 and sp.base.phase2.lr == 0.001 and sp.seeds == [42]


def test_offline_grid_uses_report_token_counts():
    sp = load_space(Path(__file__).parent.parent / "spaces" / "grid_4arch_offline.yaml")
    assert sp.data.source == "wiki" and sp.data.size_unit == "tokens"
    assert sp.data.sizes == [62891, 122795, 240132, 587970]


def test_overrides_set_nested_keys_and_parse_yaml_values():
    raw = {"model": {"num_layers": 6}, "data": {"source": "wiki", "sizes": {"tokens": [1, 2]}}}
    out = apply_overrides(raw, ["model.num_layers=3", "phase1.lr=1e-3", "data.sizes={tokens: [10, 20]}"])
    assert out["model"]["num_layers"] == 3
    assert out["phase1"]["lr"] == 1e-3
    assert out["data"]["sizes"] == {"tokens": [10, 20]}
    assert raw["model"]["num_layers"] == 6  # the original is untouched


def test_every_problem_is_reported_at_once():
    raw = {
        "model": {"num_layers": 0, "context_dim": "wide", "colour": 3},
        "phase1": {"lr": -1},
        "sampler": {"type": "annealing"},
        "objective": "loss",
        "data": {"source": "wiki", "sizes": {"tokens": [100, 50]}},
        "bogus": 1,
    }
    with pytest.raises(ConfigError) as e:
        parse_space(raw)
    text = str(e.value)
    for needle in ("model.num_layers", "model.context_dim", "model.colour", "phase1.lr", "sampler.type", "objective", "data.sizes", "bogus"):
        assert needle in text, needle


def test_tpe_space_with_warm_start_and_distributions():
    raw = {
        "sampler": {"type": "tpe", "seed": 1},
        "parameters": {
            "num_layers": {"type": "int", "low": 1, "high": 4},
            "phase1.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "num_input_tokens": [1, 2],
        },
        "warm_start": {"configs": {"a": {"num_layers": 2, "num_input_tokens": 2}}},
        "data": {"source": "wiki", "sizes": {"tokens": [100, 200]}},
    }
    sp = parse_space(raw)
    assert set(sp.parameters) == {"num_layers", "phase1.lr", "num_input_tokens"}
    assert sp.parameters["phase1.lr"].log
    assert sp.configs == {"a": {"num_layers": 2, "num_input_tokens": 2}}
    assert sp.n_trials == 20


def test_cartesian_grid_expands_parameters():
    raw = {"sampler": "grid", "parameters": {"num_layers": [1, 2], "context_dim": {"type": "int", "low": 8, "high": 16, "step": 8}},
           "data": {"source": "wiki", "sizes": {"tokens": [100, 200]}}}
    sp = parse_space(raw)
    assert len(sp.configs) == 4 and not sp.parameters
    assert {"num_layers": 2, "context_dim": 16} in sp.configs.values()


def test_constraint_violations():
    raw = {"sampler": {"type": "grid", "configs": {"big": {"num_layers": 12, "context_dim": 2048}}},
           "constraints": {"max_phase1_params": 1e6}, "data": {"source": "wiki", "sizes": {"tokens": [100, 200]}}}
    with pytest.raises(ConfigError, match="phase1_params"):
        parse_space(raw)


def test_searches_default_to_ppl_at_target_and_grids_to_alpha():
    data = {"source": "wiki", "sizes": {"tokens": [100, 200]}}
    search = parse_space({"sampler": {"type": "tpe"}, "parameters": {"num_layers": [1, 2]}, "data": data})
    assert [(o.name, o.target_tokens, o.direction) for o in search.objectives] == [("ppl_at", 1e7, "minimize")]
    assert [o.name for o in parse_space({"sampler": "grid", "data": data}).objectives] == ["alpha"]
    assert [o.name for o in parse_space({"data": data}).objectives] == ["alpha"]  # a grid by default
    # alpha stays available, guarded by the admissibility rule and the capped rule
    sp = parse_space({"sampler": "tpe", "objective": "alpha", "parameters": {"num_layers": [1, 2]}, "data": data,
                      "admissible": {"max_ppl_ratio": 1.5}, "capped": "infeasible"})  # fmt: skip
    assert sp.admissible == {"max_ppl_ratio": 1.5} and sp.capped == "infeasible" and sp.n_trial_constraints == 2


def test_bad_admissibility_and_capped_rules_are_named():
    data = {"source": "wiki", "sizes": {"tokens": [100, 200]}}
    with pytest.raises(ConfigError) as e:
        parse_space({"sampler": "tpe", "parameters": {"num_layers": [1, 2]}, "data": data,
                     "admissible": {"max_ppl_ratio": 0.5, "min_acc": 1}, "capped": "retry"})  # fmt: skip
    text = str(e.value)
    for needle in ("admissible.max_ppl_ratio: expected a factor >= 1", "admissible.min_acc: unknown rule", "capped: expected flag, infeasible or {retry"):
        assert needle in text, needle
    with pytest.raises(ConfigError) as e:
        parse_space({"data": data, "phase2": {"max_epochs": 10}, "capped": {"retry": {"phase2.max_epochs": 5, "phase1.lr": 1}}})
    assert "capped.retry.phase2.max_epochs: expected an integer above the space's phase2.max_epochs = 10" in str(e.value)
    assert "capped.retry.phase1.lr: only the caps can be raised" in str(e.value)
    sp = parse_space({"data": data, "capped": {"retry": {"phase1.max_iterations": 80, "phase2.max_epochs": 20}}})
    assert sp.capped == "retry" and sp.capped_retry == {"phase1.max_iterations": 80, "phase2.max_epochs": 20}
    with pytest.raises(ConfigError, match="the grid sampler cannot learn constraints"):
        parse_space({"sampler": "grid", "data": data, "admissible": {"max_ppl_ratio": 2}})


@pytest.mark.parametrize("raw, where", [
    ({}, "data"),  # an empty file
    ({"study": {"name": "x"}}, "data"),
    ({"data": {"source": "wiki"}}, "data.sizes"),
    ({"objective": "final_ppl", "data": {"source": "wiki"}}, "data.sizes"),  # once valid, with 0 runs
    ({"objective": "final_ppl", "data": {"source": "wiki", "sizes": {"tokens": []}}}, "data.sizes"),
])
def test_a_space_without_sizes_is_refused_naming_data(raw, where):
    """README: every section but data is optional. A space with no training sizes names the
    missing section (not an objective's need for two sizes), whatever the objective."""
    with pytest.raises(ConfigError) as e:
        parse_space(raw)
    assert e.value.problems == [f"{where}: missing or empty; a space file needs at least data: "
                                "{source: wiki, sizes: {tokens: [1000, 2000, 4000]}} (the training sizes, in tokens or samples)"]  # fmt: skip
