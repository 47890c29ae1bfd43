"""optuna-dashboard behind a Host check.

The dashboard can delete studies and edit notes, and it listens on 127.0.0.1; a page on any
web site could still reach it through DNS rebinding (a name of the attacker's that resolves
to 127.0.0.1), its requests carrying the attacker's name in their Host header. So only
requests whose Host names the address served are answered, unless the user allows more
names (``--allow-host``) or any (``--any-host``).
"""

from __future__ import annotations

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


def serve(storage, host: str, port: int, artifact_store, allow: Iterable[str] = (), any_host: bool = False) -> None:
    """Serve optuna-dashboard on ``host:port`` until interrupted (as ``run_server`` does)."""
    import bottle
    import optuna_dashboard

    app = optuna_dashboard.wsgi(storage, artifact_store=artifact_store)
    if not any_host:
        app = host_check(app, allowed_hosts(host, port, allow), f"{_bracket(host)}:{port}")
    bottle.run(app, host=host, port=port, quiet=True)
