"""optuna-dashboard behind a Host check, with each trial's config name where it lists trials.

The dashboard can delete studies and edit notes, and it listens on 127.0.0.1; a page on any
web site could still reach it through DNS rebinding (a name of the attacker's that resolves
to 127.0.0.1), its requests carrying the attacker's name in their Host header. So only
requests whose Host names the address served are answered, unless the user allows more
names (``--allow-host``) or any (``--any-host``).

Config names (:func:`config_names`): optuna-dashboard (0.21.0, the newest) labels its trial
list "Trial N" in its compiled page, with no setting, attribute or hook to change that. So the
pages it serves get one small script (``TRIAL_NAMES_JS``) that relabels the list's entries
"Trial N · <config>" from ``/archsearch/api/studies/<id>/names``; where it finds no such entry
(another dashboard version) it changes nothing. Its trial table (the "Smart Selection" page:
0.20 removed the "Trials (Table)" page and left its ``/trialTable`` address blank, which is
sent there) shows ``config_name`` as the first user-attribute column and leaves out the
columns of lists, mappings and long texts, whose cells made its rows taller than the screen.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def allowed_hosts(host: str, port: int, extra: Iterable[str] = ()) -> set[str]:
    """Host header values (lower case, with and without the port where the port may be
    left out) that name a server bound to ``host:port``."""
    names = {_bracket(host.lower())}
    if names & {"127.0.0.1", "localhost", "[::1]"} or host in WILDCARDS:
        names |= set(LOOPBACK_NAMES)
    if host in WILDCARDS:  # every interface: this machine's names and addresses
        names.discard(_bracket(host))
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn().lower()}
        try:
            names |= {_bracket(info[4][0]) for info in socket.getaddrinfo(hostname, None)}
        except OSError:
            pass
    out = set()
    for name in names:
        out |= {f"{name}:{port}"} | ({name} if port == 80 else set())
    for name in extra:  # NAME (on the served port) or NAME:PORT
        name = name.strip().lower()
        has_port = name.rsplit(":", 1)[-1].isdigit() and (not name.startswith("[") or "]:" in name)
        out |= {name} if has_port else {f"{_bracket(name)}:{port}", _bracket(name)}
    return out


def host_check(app: Callable, allowed: set[str], served: str) -> Callable:
    """A WSGI middleware answering 403 to a request whose Host header is not in ``allowed``."""

    def guarded(environ: dict[str, Any], start_response: Callable):
        given = environ.get("HTTP_HOST", "").strip().lower()
        if given in allowed:
            return app(environ, start_response)
        body = (
            f"archsearch dashboard: the Host header {given[:100]!r} does not name this server ({served}); "
            "requests through other names are refused (DNS rebinding). Start it with --allow-host NAME "
            "to allow a name, or --any-host.\n"
        ).encode()
        start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return guarded


FIRST_USER_ATTRS = ("config_name", "family")
"""User attributes the trial table shows first (before the others, which stay in their order)."""

TRIAL_NAMES_JS = """(() => {
  const names = {};  // study id -> {trial number: config name}
  const asked = {};
  const study = () => (location.pathname.match(/\\/studies\\/(\\d+)/) || [])[1];
  function relabel() {
    const sid = study();
    if (sid === undefined) return;
    if (!(sid in asked)) {
      asked[sid] = true;
      fetch(`/archsearch/api/studies/${sid}/names`).then(r => r.ok ? r.json() : {}).then(n => { names[sid] = n; relabel(); }).catch(() => {});
      return;
    }
    const known = names[sid];
    if (!known) return;
    for (const el of document.querySelectorAll(".MuiListItemButton-root .MuiListItemText-primary")) {
      const m = el.textContent.match(/^Trial (\\d+)$/);
      if (m && known[m[1]] !== undefined) el.textContent = `Trial ${m[1]} \u00b7 ${known[m[1]]}`;
    }
  }
  new MutationObserver(relabel).observe(document.documentElement, {childList: true, subtree: true, characterData: true});
  addEventListener("popstate", relabel);
  relabel();
})();
"""
"""Relabels the trial list's "Trial N" entries with their config names (no other change)."""

_NAMES = re.compile(r"^/archsearch/api/studies/(\d+)/names$")
_STUDY_API = re.compile(r"^/api/studies/(\d+)$")
_TRIAL_TABLE = re.compile(r"^(/dashboard/studies/\d+)/trialTable$")


def config_names(storage, study_id: int) -> dict[str, str]:
    """Trial number (as text) -> its config name, for the trials that have one."""
    out = {}
    for t in storage.get_all_trials(study_id, deepcopy=False):
        name = t.user_attrs.get("config_name")
        if isinstance(name, str):
            out[str(t.number)] = name
    return out


def with_config_names(app: Callable, storage) -> Callable:
    """A WSGI middleware: the names endpoint and script, the script in the dashboard's pages,
    the trial table's user-attribute columns (:func:`_table_columns`), ``/trialTable`` sent to the table."""

    wide: dict[int, set[str]] = {}  # study id -> its wide user attributes

    def respond(start_response, status: str, body: bytes, ctype: str, extra=()):
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))), *extra])
        return [body]

    def wrapped(environ: dict[str, Any], start_response: Callable):
        path = environ.get("PATH_INFO", "")
        if path == "/archsearch/trial-names.js":
            return respond(start_response, "200 OK", TRIAL_NAMES_JS.encode(), "application/javascript; charset=utf-8")
        m = _NAMES.match(path)
        if m:
            try:
                names = config_names(storage, int(m.group(1)))
            except KeyError:  # optuna: no study with that id
                return respond(start_response, "404 Not Found", b"{}", "application/json")
            return respond(start_response, "200 OK", json.dumps(names).encode(), "application/json")
        m = _TRIAL_TABLE.match(path)
        if m:  # optuna-dashboard >= 0.20 has no page there any more: its table is on smartSelection
            return respond(start_response, "302 Found", b"", "text/plain", [("Location", f"{m.group(1)}/smartSelection")])
        api = _STUDY_API.match(path)
        if not (path == "/dashboard" or path.startswith("/dashboard/") or api):
            return app(environ, start_response)

        captured: dict[str, Any] = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return lambda data: None  # optuna-dashboard (bottle) returns its body, never writes

        chunks = app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
        if captured["status"].startswith("200") and not any(k.lower() == "content-encoding" for k, _ in headers):
            if ctype.startswith("text/html") and b"</body>" in body:
                body = body.replace(b"</body>", b'<script src="/archsearch/trial-names.js"></script></body>', 1)
            elif api and ctype.startswith("application/json"):
                sid = int(api.group(1))
                if sid not in wide:
                    wide[sid] = wide_user_attrs(storage, sid)
                body = _table_columns(body, wide[sid])
        start_response(captured["status"], [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return wrapped


TABLE_VALUE_CHARS = 80
"""A user attribute whose value is a list, a mapping or longer text than this in any trial is
left out of the trial table's columns (it stays on each trial's page)."""


def _wide(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > TABLE_VALUE_CHARS
    return isinstance(value, (list, dict))


def wide_user_attrs(storage, study_id: int) -> set[str]:
    """The user attributes that are a list, a mapping or long text in some trial of the study."""
    return {k for t in storage.get_all_trials(study_id, deepcopy=False) for k, v in t.user_attrs.items() if _wide(v)}


def _table_columns(body: bytes, wide: set[str]) -> bytes:
    """A study's detail with ``config_name`` (and ``family``) first among the user-attribute
    columns and the ``wide`` ones (``sizes``, ``fit``, ...) left out of them: one such cell (the
    per-size records run to thousands of characters) made every row of the table taller than
    the screen, so the table showed as a blank area. ``wide`` grows with the trials seen
    (the dashboard's polls carry only the trials after its cursor)."""
    try:
        detail = json.loads(body)
    except ValueError:
        return body
    attrs = detail.get("union_user_attrs") if isinstance(detail, dict) else None
    if not isinstance(attrs, list):
        return body
    for t in detail.get("trials") or []:
        for a in t.get("user_attrs") or []:
            v = a.get("value")  # the dashboard sends every value as text, lists and mappings as JSON
            if isinstance(v, str) and (len(v) > TABLE_VALUE_CHARS or v[:1] in ("[", "{")):
                wide.add(a.get("key"))
    rank = {k: i for i, k in enumerate(FIRST_USER_ATTRS)}
    kept = [a for a in attrs if a.get("key") not in wide or a.get("key") in rank]
    detail["union_user_attrs"] = sorted(kept, key=lambda a: rank.get(a.get("key"), len(rank)))  # stable: the rest keep their order
    return json.dumps(detail).encode()


def serve(storage, host: str, port: int, artifact_store, allow: Iterable[str] = (), any_host: bool = False) -> None:
    """Serve optuna-dashboard on ``host:port`` until interrupted (as ``run_server`` does)."""
    import bottle
    import optuna_dashboard

    app = with_config_names(optuna_dashboard.wsgi(storage, artifact_store=artifact_store), storage)
    if not any_host:
        app = host_check(app, allowed_hosts(host, port, allow), f"{_bracket(host)}:{port}")
    bottle.run(app, host=host, port=port, quiet=True)
