"""A corpus of malformed space files and override strings: each exits with 2, names the key
and the problem (every problem of a file at once), and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cli, tiny_space, write_space

BAD = Path(__file__).parent / "bad_spaces"

# file -> strings the error must contain (the key and the problem)
FILES = {
    "yaml_unclosed.yaml": ["YAML syntax error", "line"],
    "yaml_tab_indent.yaml": ["YAML syntax error"],
    "duplicate_key.yaml": ["duplicate key 'model'"],
    "not_a_mapping.yaml": ["must be a mapping"],
    "unknown_section.yaml": ["modle: unknown section"],
    "unknown_model_field.yaml": ["model.num_layer: unknown field"],
    "width_not_a_number.yaml": ["model.context_dim: expected an integer"],
    "zero_width.yaml": ["model.context_dim: must be >= 1"],
    "negative_layers.yaml": ["model.num_layers: must be >= 1"],
    "zero_input_tokens.yaml": ["model.num_input_tokens: must be >= 1"],
    "one_size_for_alpha.yaml": ["data.sizes", "at least two"],
    "decreasing_sizes.yaml": ["data.sizes", "increasing"],
    "duplicate_sizes.yaml": ["data.sizes"],
    "unknown_sampler.yaml": ["sampler.type: unknown sampler 'annealing'"],
    "unknown_objective.yaml": ["objective: unknown objective 'loss'"],
    "unknown_source.yaml": ["data.source", "wikipedia"],
    "unreadable_data_path.yaml": ["data.paths[0]", "/nonexistent/corpus.txt"],
    "negative_lr.yaml": ["phase1.lr: must be > 0"],
    "diversity_weight_out_of_range.yaml": ["phase1.dist_reg_weight: must lie in [0, 1]"],
    "min_above_max_iterations.yaml": ["phase1.min_iterations", "phase1.max_iterations"],
    "inverted_distribution.yaml": ["parameters.num_layers: low (8) is above high (2)"],
    "tpe_without_parameters.yaml": ["parameters: the tpe sampler needs at least one parameter"],
    "grid_config_unknown_field.yaml": ["sampler.configs.a.depth: unknown field"],
    "unknown_pruner.yaml": ["early_stopping.pruner: unknown pruner 'magic'"],
    "ppl_at_negative_target.yaml": ["objective.target_tokens: expected a positive token count"],
    "grid_breaks_constraint.yaml": ["sampler.configs.big", "exceeds max_phase1_params"],
    "python_object_tag.yaml": ["YAML syntax error", "python/object/apply"],
    "unknown_storage_scheme.yaml": ["unknown scheme 'mongodb'"],
    "warm_start_outside_range.yaml": ["warm_start.configs.w.num_layers: 9 is outside"],
    "bad_seeds.yaml": ["seeds: expected a non-empty list of integers"],
    "fractional_gpus_above_one.yaml": ["resources.gpus: above 1 a trial takes whole GPUs"],
    "many_problems.yaml": ["model.num_layers", "model.context_dim", "phase2.max_epochs", "sampler.type", "objective", "data.sizes"],
}

# override string(s) on a good space -> strings the error must contain
OVERRIDES = [
    (["model.num_layers=0"], ["model.num_layers: must be >= 1"]),
    (["model.context_dim=abc"], ["model.context_dim: expected an integer"]),
    (["phase2.max_epochs=-1"], ["phase2.max_epochs: must be >= 1"]),
    (["data.sizes={tokens: [5000, 100]}"], ["data.sizes"]),
    (["sampler.type=bogus"], ["sampler.type: unknown sampler 'bogus'"]),
    (["nonsense"], ["override 'nonsense': expected dotted.key=value"]),
    (["=3"], ["expected dotted.key=value"]),
    (["model..num_layers=2"], ["expected dotted.key=value"]),
    (["engine.precision=fp8"], ["engine.precision: must be one of"]),
    (["data.sizes={tokens: [400, 800, 100000000]}"], ["data.sizes: 100,000,000 tokens asked", "holds"]),
    (["resources.gpus=64"], ["resources.gpus: 64 GPU per trial", "Ray cluster has 0"]),
    (["--storage", "notaurl"], ["not a storage URL"]),
    (["--storage", "postgresql://user:hunter2@/db"], ["no host", "***"]),
    (["--n-trials", "3"], ["--n-trials: a grid runs exactly its configs"]),
]


def _nothing_written(home: Path) -> None:
    written = sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) if home.exists() else []
    # a valid prepared-data folder may exist (checking sizes against the data needs it); no study, trial or run-cache entry
    assert not [p for p in written if not p.startswith("data")], written


@pytest.mark.parametrize("name", sorted(FILES))
def test_bad_space_file(name, tmp_path):
    home = tmp_path / "home"
    r = cli("run", str(BAD / name), env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    for needle in FILES[name]:
        assert needle in r.stderr, (needle, r.stderr)
    assert "Traceback" not in r.stderr
    _nothing_written(home)
    assert not Path("/tmp/archsearch-pwned").exists()


@pytest.mark.parametrize("args, needles", OVERRIDES, ids=lambda x: " ".join(x) if isinstance(x, list) and x and isinstance(x[0], str) else None)
def test_bad_override(args, needles, tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "good.yaml", tiny_space(tiny_corpus))
    r = cli("run", str(space), *args, env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)
    assert "Traceback" not in r.stderr and "hunter2" not in r.stderr + r.stdout
    _nothing_written(home)


def test_corpus_is_large_enough():
    assert len(FILES) + len(OVERRIDES) >= 25 and len(list(BAD.glob("*.yaml"))) == len(FILES)
