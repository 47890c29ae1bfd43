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
    ("sqlite:////tmp/a@b?.db", "sqlite:////tmp/a@b?.db"),
    ("journal:///tmp/s.log", "journal:///tmp/s.log"),
    ("postgresql://u@h:5432/db?password=hunter2", "postgresql://u@h:5432/db?password=***"),
    ("postgresql://u@h:5432/db?sslmode=disable&password=se%20cr@t", "postgresql://u@h:5432/db?password=***&sslmode=disable"),
    ("postgresql://u:p@ss word@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:p@ss@h/db?passfile=/x&token=abc", "postgresql://u:***@h/db?passfile=***&token=***"),
    ("postgresql://u:pw@h:notaport/db", "postgresql://***"),
])  # fmt: skip
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def test_a_report_shows_the_storage_without_the_machines_paths_or_a_password(tmp_path, monkeypatch):
    """What a report header and a study's dashboard note show (storage.shown_url): a file in
    ARCHSEARCH_HOME relative to it, another as the user gave it, a database URL masked."""
    from archsearch.search.storage import resolve_url, shown_url

    home = tmp_path / "home"
    monkeypatch.setenv("ARCHSEARCH_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for given, shown in [
        (None, "sqlite:///$ARCHSEARCH_HOME/archsearch.db"),  # the default storage
        (f"sqlite:///{home}/sub/x.db", "sqlite:///$ARCHSEARCH_HOME/sub/x.db"),
        (f"journal:///{home}/s.log", "journal:///$ARCHSEARCH_HOME/s.log"),
        ("sqlite:///other/x.db", "sqlite:///other/x.db"),  # relative to where it ran, as given
        ("postgresql://u:hunter2@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db?password=hunter2", "postgresql://u@h/db?password=***"),
    ]:  # fmt: skip
        url = resolve_url(given)
        assert shown_url(url, given) == shown, given
        assert str(tmp_path) not in shown_url(url, given) and "hunter2" not in shown_url(url, given)


@pytest.mark.parametrize("url, secret", [
    ("postgresql://u:secret@h/db", "secret"),
    ("postgresql://u:p%40ss%20w@h/db", "p@ss w"),
    ("postgresql://u@h/db?password=se%20cr@t", "se cr@t"),
    ("postgresql://u:p@ss word@h/db", "p@ss word"),
])  # fmt: skip
def test_redact_masks_every_form_of_the_password(url, secret):
    from urllib.parse import quote, quote_plus

    from archsearch.search.storage import redact, secrets_of

    assert secret in secrets_of(url)
    for form in (secret, quote(secret, safe=""), quote_plus(secret), url):
        text = redact(f"could not connect to {url}: refused ({form})", url)
        assert secret not in text and quote(secret, safe="") not in text and "***" in text, text


def _role(admin_url: str, password: str) -> str:
    """A login role with ``password`` that owns the database of ``admin_url``; returns its name."""
    import uuid

    import psycopg
    from psycopg import sql

    name = "r" + uuid.uuid4().hex[:8]
    db = admin_url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(db), sql.Identifier(name)))
        conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(name)))
    return name


# (how the password is written in the URL, the password): every form a user may write
URL_FORMS = {
    "userinfo": ("{u}:{pw}@{h}/{db}", "plain-Pw9"),
    "percent_encoded": ("{u}:{pw_q}@{h}/{db}", "p@ss w/rd?%x"),
    "raw_at": ("{u}:{pw}@{h}/{db}", "p@ss@x"),
    "raw_space": ("{u}:{pw}@{h}/{db}", "pass word"),
    "query": ("{u}@{h}/{db}?password={pw_q}", "q-p@ss w"),
    "query_raw_at": ("{u}@{h}/{db}?sslmode=disable&password={pw}", "q@raw"),
}


@pytest.fixture
def pg_url(postgres):
    """A factory: (form) -> a URL to a fresh database whose owner's password is written in that form."""
    from urllib.parse import quote

    def make(form: str) -> tuple[str, str]:
        template, password = URL_FORMS[form]
        admin = postgres()
        host = admin.split("@", 1)[1].rsplit("/", 1)[0]
        db = admin.rsplit("/", 1)[1]
        user = _role(admin, password)
        url = "postgresql://" + template.format(u=user, pw=password, pw_q=quote(password, safe=""), h=host, db=db)
        return url, password

    return make


@pytest.mark.parametrize("form", sorted(URL_FORMS))
def test_every_url_form_connects_and_no_message_shows_the_password(form, pg_url, tmp_path):
    """A real PostgreSQL server takes the password whole (the parse is right), and the shown
    URL, a failed connection's error and the storage URL Optuna keeps hide it."""
    from archsearch.errors import UserError
    from archsearch.search.storage import resolve_url

    url, password = pg_url(form)
    shown = mask_url(resolve_url(url))
    assert password not in shown and "***" in shown
    storage = open_storage(resolve_url(url))  # connects with the password, creates the tables
    optuna.create_study(study_name="s", storage=storage)
    assert "s" in [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    storage.engine.dispose()
    wrong = url.replace(password, password + "x").replace(quote_all(password), quote_all(password + "x"))
    with pytest.raises(UserError) as e:
        open_storage(resolve_url(wrong), create=False)
    assert "password authentication failed" in str(e.value)
    assert password not in str(e.value) and quote_all(password) not in str(e.value)


def quote_all(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def test_a_failed_connection_never_shows_the_password(tmp_path):
    """Nobody listens on the port: the driver's error is shown, the password (with a space and
    an @, in the user info and in the query) is not."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "home"
    space = tmp_path / "s.yaml"
    space.write_text("data: {source: wiki, sizes: {tokens: [1000, 2000]}}\n")
    userinfo, query = f"postgresql://u:pa ss@word@127.0.0.1:{port}/db", f"postgresql://u@127.0.0.1:{port}/db?password=pa ss@word"
    for args in (["studies", "--storage", userinfo], ["run", str(space), "--storage", query, "--dry-run"]):
        r = cli(*args, env={"ARCHSEARCH_HOME": str(home), "COLUMNS": "1000"})  # no line wrapped inside a secret
        assert r.returncode == 2, r.stdout + r.stderr
        assert "cannot open storage" in r.stderr and "Connection refused" in r.stderr and "Traceback" not in r.stderr
        for part in ("pa ss@word", "pa%20ss", "ss@word", "pa ss"):
            assert part not in r.stdout + r.stderr, (part, r.stderr)
    assert not home.exists() or not any(home.rglob("*"))


@pytest.mark.parametrize("form", ["query", "raw_space"])
def test_studies_and_dry_run_hide_the_password(form, pg_url, tmp_path, tiny_corpus):
    url, password = pg_url(form)
    from archsearch.search.storage import resolve_url

    optuna.create_study(study_name="tiny", storage=open_storage(resolve_url(url)))
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    texts = []
    for args in (["studies", "--storage", url, "--json", str(tmp_path / "studies.json")],
                 ["run", str(space), "--storage", url, "--dry-run", "--json", str(tmp_path / "dry.json")]):  # fmt: skip
        r = cli(*args, env={"ARCHSEARCH_HOME": str(home), "COLUMNS": "1000"})
        assert r.returncode == 0, r.stdout + r.stderr
        texts.append(r.stdout + r.stderr)
    assert "***" in texts[0] + texts[1]
    texts += [(tmp_path / "studies.json").read_text(), (tmp_path / "dry.json").read_text()]
    for text in texts:
        assert password not in text and quote_all(password) not in text


@pytest.mark.slow
@pytest.mark.parametrize("form", ["query", "percent_encoded"])
def test_password_never_appears_in_output_reports_or_the_study(form, tmp_path, tiny_corpus, pg_url):
    """Nor in any file the runs leave under the home (Ray's session logs among them), nor the
    cloud credentials of the driver's environment, which Ray Tune would copy into each trial's
    runtime_env and Ray's runtime-env agent would log."""
    url, password = pg_url(form)
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    outputs = []
    cloud = {"AWS_ACCESS_KEY_ID": "AKIA-env-S3cret-id", "AWS_SECRET_ACCESS_KEY": "aws-env-S3cret-key", "AWS_SESSION_TOKEN": "aws-env-S3cret-token"}
    for args in (["run", str(space), "--storage", url, "--json", str(tmp_path / "run.json")], ["studies", "--storage", url],
                 ["report", "--storage", url, "--out", str(tmp_path / "report"), "--json", str(tmp_path / "summary.json")],
                 ["run", str(space), "--storage", url, "--dry-run"]):  # fmt: skip
        r = cli(*args, env={"ARCHSEARCH_HOME": str(home), "COLUMNS": "1000", **cloud})
        assert r.returncode == 0, r.stdout + r.stderr
        outputs.append(r.stdout + r.stderr)
    assert "view it: archsearch dashboard --storage postgresql://" in outputs[0]
    wrong = url.replace(quote_all(password), quote_all(password + "-wrong")).replace(password, password + "-wrong")
    r = cli("run", str(space), "--storage", wrong, env={"ARCHSEARCH_HOME": str(home), "COLUMNS": "1000"})
    assert r.returncode == 2 and "***" in r.stderr
    outputs.append(r.stdout + r.stderr)
    files = [p.read_text(errors="replace") for p in [*(tmp_path / "report").iterdir(), tmp_path / "run.json", tmp_path / "summary.json"]
             if p.suffix in (".md", ".json", ".csv")]  # fmt: skip
    from archsearch.search.storage import resolve_url

    study = optuna.load_study(study_name="tiny", storage=open_storage(resolve_url(url), create=False))
    attrs = json.dumps([study.user_attrs, study._storage.get_study_system_attrs(study._study_id)]
                       + [[t.user_attrs, t.system_attrs] for t in study.trials], default=str)  # fmt: skip
    assert "***" in attrs or "postgresql://" not in attrs  # the dashboard note names the storage masked, if at all
    for text in [*outputs, *files, attrs]:
        for secret in (password, quote_all(password), password + "-wrong"):
            assert secret not in text
    left = [p for p in home.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "runtime_env_agent.log" for p in left)  # Ray's logs are among them
    for p in left:
        data = p.read_bytes()
        for secret in (password, quote_all(password), *cloud.values()):
            assert secret.encode() not in data, (p, secret)


def test_embedded_ray_starts_no_dashboard(home):  # home: Ray's folder goes under it
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


def test_mask_args_hides_every_password_on_a_command_line():
    from archsearch.search.storage import mask_args

    args = ["archsearch", "run", "s.yaml", "--storage", "postgresql://u:p@ss word@h/db", "--storage=postgresql://u@h/db?password=pw-q",
            "tracking.mlflow.tracking_uri=http://me:tok-3n@mlflow:5000/", "sqlite:////tmp/a@b.db", "postgresql://u:pw-port@h:x/db"]  # fmt: skip
    shown = mask_args(args)
    assert shown == ["archsearch", "run", "s.yaml", "--storage", "postgresql://u:***@h/db", "--storage=postgresql://u@h/db?password=***",
                     "tracking.mlflow.tracking_uri=http://me:***@mlflow:5000/", "sqlite:////tmp/a@b.db", "postgresql://***"]  # fmt: skip


RAY_JOB_CHILD = """
import json, sys
from archsearch.search.runner import init_ray

ray = init_ray(None)
jobs = ray._private.worker.global_worker.gcs_client.get_all_job_info()
print(json.dumps([[j.entrypoint, str(j)] for j in jobs.values()]))
ray.shutdown()
"""


def test_rays_job_table_does_not_show_the_drivers_password(short_dir):
    """Ray keeps its driver's command line as the job's entrypoint (``ray list jobs``, a
    cluster's dashboard): ``--storage postgresql://user:PASSWORD@…`` reaches it masked."""
    import subprocess
    import sys

    url = "postgresql://u:ray-Job-S3cret@db.example/x?sslmode=disable&password=ray-Q-S3cret"
    r = subprocess.run([sys.executable, "-c", RAY_JOB_CHILD, "--storage", url], capture_output=True, text=True, timeout=300,
                       env=dict(__import__("os").environ, ARCHSEARCH_HOME=str(short_dir / "h")))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    ((entrypoint, job),) = json.loads(r.stdout.strip().splitlines()[-1])
    assert "--storage postgresql://u:***@db.example/x?password=***&sslmode=disable" in entrypoint, entrypoint
    assert "S3cret" not in job  # the whole job record


def test_tune_copies_no_cloud_credentials_into_the_trials_runtime_env(monkeypatch):
    """Ray Tune copies the driver's AWS credentials into every trainable's runtime_env, which
    Ray's runtime-env agent logs in plain text under the home (session_*/logs/runtime_env_agent.log);
    while archsearch's Tune runs, they stay out (the real class cache Tune uses)."""
    from ray.tune.execution.class_cache import _ActorClassCache

    from archsearch.search.runner import CREDENTIAL_VARS, _no_credentials_to_trials

    for var in CREDENTIAL_VARS:
        monkeypatch.setenv(var, "aws-S3cret-" + var)
    monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")  # one Tune does propagate: still propagated

    class Trainable:
        pass

    with _no_credentials_to_trials():
        env = _ActorClassCache().get(Trainable)._default_options["runtime_env"]["env_vars"]
    assert env.get("RAY_CHDIR_TO_TRIAL_DIR") == "0"
    assert not any("S3cret" in v for v in env.values()), env
    after = _ActorClassCache().get(type("Other", (), {}))._default_options["runtime_env"]["env_vars"]
    assert all(var in after for var in CREDENTIAL_VARS)  # Ray's own behaviour is back outside the run


def test_a_password_kept_off_the_command_line(pg_url, tmp_path):
    """`ps` shows every user a process's command line: the README's way to keep the password
    off it (libpq's PGPASSWORD, or ~/.pgpass) works with a URL that has none."""
    url, password = pg_url("userinfo")
    bare = url.replace(f":{password}@", "@")
    assert password not in bare
    from archsearch.search.storage import resolve_url

    optuna.create_study(study_name="offline", storage=open_storage(resolve_url(url)))
    home = tmp_path / "home"
    r = cli("studies", "--storage", bare, env={"ARCHSEARCH_HOME": str(home), "PGPASSWORD": password, "COLUMNS": "1000"})
    assert r.returncode == 0 and "offline" in r.stdout, r.stdout + r.stderr
    pgpass = tmp_path / "pgpass"
    host_port, db = bare.split("@", 1)[1].split("/", 1)
    user = bare.split("//", 1)[1].split("@", 1)[0]
    pgpass.write_text(f"{host_port}:{db}:{user}:{password}\n")  # host:port:database:user:password
    pgpass.chmod(0o600)
    r = cli("studies", "--storage", bare, env={"ARCHSEARCH_HOME": str(home), "PGPASSFILE": str(pgpass), "COLUMNS": "1000"})
    assert r.returncode == 0 and "offline" in r.stdout, r.stdout + r.stderr
    r = cli("studies", "--storage", bare, env={"ARCHSEARCH_HOME": str(home), "PGPASSWORD": password + "x", "COLUMNS": "1000"})
    assert r.returncode == 2 and "password authentication failed" in r.stderr and password not in r.stderr


def test_a_bugs_traceback_masks_the_command_lines_passwords(monkeypatch, capsys, tmp_path):
    """An unexpected error (a bug) still prints its traceback and exits 1, but a storage URL
    its message quotes (an Engine's repr shows ?password= unmasked) has its password masked."""
    from archsearch import cli
    from archsearch.search import storage

    url = "postgresql://u:tb-S3cret@db.example/x?password=tb-Q-S3cret"

    def broken(given, label="--storage"):
        from sqlalchemy.engine import make_url

        raise RuntimeError(f"unexpected: {given} / Engine({make_url(given)!r}) / tb-S3cret / http://me:tb-H-S3cret@mlflow/")

    monkeypatch.setattr(storage, "existing_storage", broken)
    monkeypatch.setenv("ARCHSEARCH_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as e:
        cli.main(["studies", "--storage", url])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" in err and "RuntimeError: unexpected" in err
    assert "S3cret" not in err, err
