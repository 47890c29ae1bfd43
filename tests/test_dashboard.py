"""archsearch's layer over optuna-dashboard, through its real WSGI app on a real SQLite study:
the config-name endpoint and script, the trial table's columns (config_name first, no
list/mapping cells) in the first load and in the polls, /trialTable sent to the table."""

from __future__ import annotations

import io
import json

import optuna
import pytest

from archsearch.search.dashboard import TRIAL_NAMES_JS, with_config_names


@pytest.fixture()
def app(tmp_path):
    import optuna_dashboard

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'd.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    for name, x in (("baseline", 1.0), ("wide_96", 2.0)):
        t = study.ask()
        t.suggest_float("x", 0, 3)
        for k, v in {"sizes": [{"size": 1000, "val_ppl": 900.0}], "alpha": -0.5, "fit": {"alpha": -0.5}, "config_name": name, "note": "n" * 200}.items():
            t.set_user_attr(k, v)
        study.tell(t, x)
    return with_config_names(optuna_dashboard.wsgi(storage), storage), study._study_id


def get(app, path: str, query: str = ""):
    out = {}

    def start(status, headers, exc_info=None):
        out["status"], out["headers"] = status, dict(headers)

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080",
               "HTTP_HOST": "127.0.0.1:8080", "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http", "HTTP_ACCEPT_ENCODING": ""}  # fmt: skip
    body = b"".join(app(environ, start))
    assert int(out["headers"]["Content-Length"]) == len(body)
    return out["status"], out["headers"], body


def test_config_names_endpoint_and_script(app):
    app, sid = app
    status, headers, body = get(app, f"/archsearch/api/studies/{sid}/names")
    assert status.startswith("200") and json.loads(body) == {"0": "baseline", "1": "wide_96"}
    assert get(app, "/archsearch/api/studies/999/names")[0].startswith("404")
    status, headers, body = get(app, "/archsearch/trial-names.js")
    assert status.startswith("200") and body.decode() == TRIAL_NAMES_JS and headers["Content-Type"].startswith("application/javascript")
    # every dashboard page loads it (a file of the same origin: the dashboard's CSP allows 'self' only)
    for page in ("/dashboard", f"/dashboard/studies/{sid}/trials"):
        status, headers, body = get(app, page)
        assert status.startswith("200") and body.count(b'<script src="/archsearch/trial-names.js"></script></body>') == 1
        assert "script-src 'self'" in headers["Content-Security-Policy"]


def test_trial_table_columns_in_the_first_load_and_in_polls(app):
    app, sid = app
    # a poll carries only the trials after the dashboard's cursor (here: the first request this
    # server answers, from a page loaded before it restarted): the wide columns stay out
    _, _, body = get(app, f"/api/studies/{sid}", "after=2")
    poll = json.loads(body)
    assert poll["trials"] == [] and [a["key"] for a in poll["union_user_attrs"]] == ["config_name", "alpha"]
    _, _, body = get(app, f"/api/studies/{sid}")
    detail = json.loads(body)
    assert [a["key"] for a in detail["union_user_attrs"]] == ["config_name", "alpha"]  # no sizes/fit/long note column
    assert {a["key"] for a in detail["trials"][0]["user_attrs"]} == {"sizes", "alpha", "fit", "config_name", "note"}  # trials keep all
    assert get(app, "/api/studies/999")[0].startswith("404")


def test_the_removed_table_page_is_sent_to_the_table(app):
    app, sid = app
    status, headers, _ = get(app, f"/dashboard/studies/{sid}/trialTable")
    assert status.startswith("302") and headers["Location"] == f"/dashboard/studies/{sid}/smartSelection"


def _request(app, method: str, path: str, body: bytes = b"", ctype: str = "", **headers):
    out = {}

    def start(status, hdrs, exc_info=None):
        out["status"], out["headers"] = status, dict(hdrs)

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080",
               "HTTP_HOST": "127.0.0.1:8080", "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http", "HTTP_ACCEPT_ENCODING": "",
               "CONTENT_TYPE": ctype, "CONTENT_LENGTH": str(len(body)), "wsgi.errors": io.StringIO(), **headers}  # fmt: skip
    b"".join(app(environ, start))
    return out["status"], out["headers"]


def test_a_cross_site_page_cannot_change_a_study(app, tmp_path):
    """The Host check keeps out pages that reach the dashboard by another name (DNS rebinding);
    a page on another site may still send requests to 127.0.0.1:PORT itself. What a browser
    sends it without asking (a form, or fetch's no-cors: POST with a text/plain, form or
    multipart body) changes nothing, since optuna-dashboard reads only application/json
    bodies; DELETE, PUT and JSON bodies need a CORS preflight, which gets no permission."""
    from archsearch.search.dashboard import allowed_hosts, host_check

    wsgi, sid = app
    guarded = host_check(wsgi, allowed_hosts("127.0.0.1", 8080), "127.0.0.1:8080")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'd.db'}")
    page = {"HTTP_ORIGIN": "http://evil.example", "HTTP_REFERER": "http://evil.example/x"}
    rename = json.dumps({"study_name": "pwned"}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _ = _request(guarded, "POST", f"/api/studies/{sid}/rename", rename, ctype, **page)
        assert not status.startswith("2"), (ctype, status)
        status, _ = _request(guarded, "POST", "/api/studies", json.dumps({"study_name": "new", "directions": ["minimize"]}).encode(), ctype, **page)
        assert not status.startswith("2"), (ctype, status)
    status, headers = _request(guarded, "OPTIONS", f"/api/studies/{sid}", b"", "", HTTP_ACCESS_CONTROL_REQUEST_METHOD="DELETE", **page)
    assert not any(k.lower().startswith("access-control-allow") for k in headers), headers
    assert [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)] == ["s"]
    status, _ = _request(guarded, "POST", f"/api/studies/{sid}/rename", rename, "application/json")  # the dashboard's own request works
    assert status.startswith("2"), status
    assert [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)] == ["pwned"]
