import os

import pytest

from archsearch.data import DataSpec, check_data_spec, data_spec_from_dict
from archsearch.errors import ConfigError


def problems_of(d, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        data_spec_from_dict(d, **kwargs)
    return info.value.problems


def test_defaults_and_source_tokenizers():
    spec = data_spec_from_dict(None)
    assert spec == DataSpec()
    assert spec.source == "wiki" and spec.tokenizer_name == "minilm"
    assert data_spec_from_dict({"source": "ultrachat"}).tokenizer_name == "gpt2"
    assert data_spec_from_dict({"source": "ultrachat", "tokenizer": "org/x"}).tokenizer_name == "org/x"


def test_sizes_forms():
    spec = data_spec_from_dict({"source": "ultrachat", "sizes": {"samples": [50, 100, 200, 500]}})
    assert spec.sizes == [50, 100, 200, 500] and spec.size_unit == "samples"
    spec = data_spec_from_dict({"sizes": [6.2e4, 1.2e5], "size_unit": "tokens"})
    assert spec.sizes == [62000, 120000] and all(type(s) is int for s in spec.sizes)
    assert data_spec_from_dict({"sizes": {"tokens": [10]}, "size_unit": "tokens"}).sizes == [10]


def test_every_problem_is_reported_at_once():
    problems = problems_of(
        {
            "source": "foo",
            "sizes": [100, 50],
            "size_unit": "bytes",
            "format": "xml",
            "bogus": 1,
            "val_tokens": "many",
            "min_article_chars": -1,
        }
    )
    text = "\n".join(problems)
    assert "data.source: unknown source 'foo' (one of wiki, ultrachat, files)" in problems
    assert "data.sizes: must be strictly increasing, got [100, 50]" in problems
    for key in ("data.size_unit", "data.format", "data.bogus", "data.val_tokens", "data.min_article_chars"):
        assert key in text, key
    assert len(problems) == 7


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ([100, 100], "data.sizes: duplicate sizes [100]"),
        ([0, 5], "data.sizes[0]: expected an integer >= 1, got 0"),
        ([1.5], "data.sizes[0]: expected an integer >= 1, got 1.5"),
        ([True], "data.sizes[0]: expected an integer >= 1, got True"),
        ("100", "data.sizes: expected a list of sizes, got '100'"),
        ({"samples": [1], "tokens": [2]}, "data.sizes: a mapping must have exactly one key, samples or tokens"),
        ({"docs": [1]}, "data.sizes: a mapping must have exactly one key, samples or tokens"),
    ],
)
def test_bad_sizes(sizes, expected):
    assert any(p.startswith(expected) for p in problems_of({"sizes": sizes})), problems_of({"sizes": sizes})


def test_size_unit_contradicting_the_mapping():
    problems = problems_of({"sizes": {"samples": [5]}, "size_unit": "tokens"})
    assert problems == ["data.size_unit: 'tokens' contradicts data.sizes given in samples"]


def test_require_sizes():
    assert problems_of({}, require_sizes=True) == ["data.sizes: no training sizes given"]
    with pytest.raises(ConfigError, match="no training sizes"):
        check_data_spec(DataSpec(), require_sizes=True)


def test_files_source_checks_paths(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("hello")
    odd = tmp_path / "b.csv"
    odd.write_text("x")
    assert problems_of({"source": "files"}) == ["data.paths: source 'files' needs at least one corpus file"]
    problems = problems_of(
        {"source": "files", "paths": [str(good), str(tmp_path / "missing.txt"), str(odd), str(tmp_path)]},
        where="space.data",
    )
    assert problems[0] == f"space.data.paths[1]: no such file: {tmp_path / 'missing.txt'}"
    assert problems[1].startswith("space.data.paths[2]: cannot tell the format of b.csv")
    assert problems[2] == f"space.data.paths[3]: not a file: {tmp_path}"
    # an explicit format reads any extension
    assert data_spec_from_dict({"source": "files", "paths": [str(odd)], "format": "text"}).paths == [str(odd)]


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("hello")
    (tmp_path / "tok").mkdir()
    spec = data_spec_from_dict({"source": "files", "paths": "c.txt", "tokenizer": "tok", "cache_dir": "cache"})
    assert spec.paths == [str(tmp_path / "c.txt")]
    assert spec.tokenizer == str(tmp_path / "tok")
    assert spec.cache_dir == str(tmp_path / "cache")
    assert data_spec_from_dict({"tokenizer": "org/model"}).tokenizer == "org/model"  # not a folder: a Hub id


def test_settings_of_another_source_are_reported():
    problems = problems_of({"source": "wiki", "paths": ["x.txt"], "val_start": 5, "format": "auto"})
    assert problems == [
        "data.val_start: only used with source ultrachat (source is 'wiki')",
        "data.paths: only used with source files (source is 'wiki')",
    ]


def test_ultrachat_training_must_not_reach_validation():
    problems = problems_of({"source": "ultrachat", "sizes": {"samples": [500, 1001]}})
    assert len(problems) == 1 and problems[0].startswith("data.sizes: 1001 training conversations would overlap")
    assert data_spec_from_dict({"source": "ultrachat", "sizes": {"samples": [1000]}}).sizes == [1000]
    later = data_spec_from_dict({"source": "ultrachat", "sizes": {"samples": [1500]}, "val_start": 2000})
    assert later.val_start == 2000


def test_wrong_types():
    problems = problems_of({"tokenizer": 3, "val_count": 0, "val_paths": [1], "cache_dir": ""})
    assert problems == [
        "data.tokenizer: expected a non-empty string, got 3",
        "data.val_count: must be >= 1, got 0",
        "data.val_paths: expected a list of file paths, got [1]",
        "data.cache_dir: expected a non-empty string, got ''",
    ]
    with pytest.raises(ConfigError, match="expected a mapping"):
        data_spec_from_dict(["wiki"])


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ARCHSEARCH_HOME", raising=False)
    assert DataSpec().resolved_cache_dir() == tmp_path / "studies" / "data"
    monkeypatch.setenv("ARCHSEARCH_HOME", str(tmp_path / "home"))
    assert DataSpec().resolved_cache_dir() == tmp_path / "home" / "data"
    assert DataSpec(cache_dir="x").resolved_cache_dir() == tmp_path / "x"
    assert os.path.isabs(DataSpec().resolved_cache_dir())


def test_check_data_spec_built_in_code():
    with pytest.raises(ConfigError) as info:
        check_data_spec(DataSpec(source="files", sizes=["a", 5], size_unit="docs"))
    assert info.value.problems == [
        "data.size_unit: unknown unit 'docs' (one of samples, tokens)",
        "data.sizes: every size must be an integer >= 1, got ['a', 5]",
        "data.paths: source 'files' needs at least one corpus file",
    ]
    check_data_spec(DataSpec(sizes=[1, 2, 3]))
