"""Nobody in who does not belong: safe YAML, localhost-only servers, masked passwords, no pickles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from helpers import cli, tiny_space, write_space

from archsearch.search.storage import mask_url, open_storage

PACKAGE = Path(__file__).resolve().parents[2] / "archsearch"


def test_yaml_tags_construct_nothing(tmp_path):
    marker = tmp_path / "pwned"
    space = tmp_path / "evil.yaml"
    space.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\ndata: {{source: wiki, sizes: {{tokens: [1, 2]}}}}\n')
    for cmd in ("validate", "run", "trial"):
        r = cli(cmd, str(space), env={"ARCHSEARCH_HOME": str(tmp_path / "h")})
        assert r.returncode == 2 and "YAML" in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("url, shown", [
    ("postgresql://user:p%40ss@db.example.org:5432/studies", "postgresql://user:***@db.example.org:5432/studies"),
    ("mysql+pymysql://root:hunter2@10.0.0.1/x", "mysql+pymysql://root:***@10.0.0.1/x"),
    ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ("could not connect to postgresql://u:secret@h/db: refused", "could not connect to postgresql://u:***@h/db: refused"),
])  # fmt: skip
def test_mask_url(url, shown):
    assert mask_url(url) == shown


@pytest.mark.slow
def test_password_never_appears_in_output_reports_or_the_study(tmp_path, tiny_corpus, postgres):
    url = postgres()
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    outputs = []
    for args in (["run", str(space), "--storage", url], ["studies", "--storage", url],
                 ["report", "--storage", url, "--out", str(tmp_path / "report")], ["run", str(space), "--storage", url, "--dry-run"]):  # fmt: skip
        r = cli(*args, env={"ARCHSEARCH_HOME": str(home)})
        assert r.returncode == 0, r.stdout + r.stderr
        outputs.append(r.stdout + r.stderr)
    wrong = url.replace(postgres.password, postgres.password + "-wrong")
    r = cli("run", str(space), "--storage", wrong, env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 2 and "***" in r.stderr
    outputs.append(r.stdout + r.stderr)
    files = [p.read_text(errors="replace") for p in (tmp_path / "report").iterdir() if p.suffix in (".md", ".json", ".csv")]
    study = optuna.load_study(study_name="tiny", storage=open_storage(url, create=False))
    attrs = json.dumps([study.user_attrs, study._storage.get_study_system_attrs(study._study_id)]
                       + [[t.user_attrs, t.system_attrs] for t in study.trials], default=str)  # fmt: skip
    for text in [*outputs, *files, attrs]:
        assert postgres.password not in text and postgres.password + "-wrong" not in text


def test_embedded_ray_starts_no_dashboard():
    import ray

    from archsearch.search.runner import init_ray

    init_ray(None)
    try:
        ctx = ray.get_runtime_context()
        assert ctx is not None
        assert not ray._private.worker.global_worker.node.address_info.get("webui_url")
    finally:
        ray.shutdown()


def test_dashboard_defaults_to_localhost():
    from archsearch.cli import app

    cmd = next(c for c in app.registered_commands if c.callback.__name__ == "dashboard")
    import inspect

    assert inspect.signature(cmd.callback).parameters["host"].default.default == "127.0.0.1"


def test_prepared_data_never_unpickles(tmp_path, tiny_corpus):
    from archsearch.data import data_spec_from_dict, load_prepared, prepare_data
    from archsearch.errors import DataCorrupted

    spec = data_spec_from_dict(tiny_space(tiny_corpus)["data"])
    data = prepare_data(spec)
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(data.path, evil)
    np.save(evil / "val_tokens.npy", np.array([{"payload": 1}], dtype=object), allow_pickle=True)  # a pickled object array
    with pytest.raises((DataCorrupted, ValueError)):
        load_prepared(evil, verify=False)  # even without the checksum, numpy refuses the pickle
    with pytest.raises(DataCorrupted):
        load_prepared(evil)


def test_no_unpickling_in_the_package():
    """No pickle/torch.load on paths: every file archsearch reads is JSON, .npy without
    pickles, safetensors, tokenizer.json, YAML (safe) or an Optuna storage."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bpickle\.loads?\(|\btorch\.load\(|cloudpickle\.loads?\(", text), path
        for m in re.finditer(r"np\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in m.group(1), (path, m.group(0))
