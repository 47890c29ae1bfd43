"""Helpers of the tests (importable: ``from helpers import ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def tiny_space(corpus: dict, **sections) -> dict:
    """A small grid space on the tiny corpus; ``sections`` replace top-level keys."""
    space = {
        "study": {"name": "tiny"},
        "objective": "alpha",
        "sampler": {"type": "grid", "configs": {
            "a": {"num_layers": 1, "context_dim": 8, "num_input_tokens": 1},
            "b": {"num_layers": 2, "context_dim": 8, "num_input_tokens": 2},
        }},
        "data": {"source": "files", "paths": corpus["paths"], "tokenizer": corpus["tokenizer"], "cache_dir": corpus["cache_dir"],
                 "sizes": {"tokens": [400, 800, 1600]}, "val_tokens": 300},
        "phase1": {"batch_size": 200, "max_iterations": 6},
        "phase2": {"batch_size": 64, "max_epochs": 2},
        "resources": {"gpus": 0, "cpus": 1},
        "max_concurrent": 2,
    }  # fmt: skip
    space.update(sections)
    return space


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``archsearch`` in a subprocess, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, "-m", "archsearch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)  # fmt: skip


def read_trials(db: Path, study: str):
    """The trials of a SQLite study that another process may be creating: read-only (no
    table creation that could race with the writer)."""
    import optuna

    from archsearch.search.storage import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(f"sqlite:///{db}", create=False)).get_trials()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def listening_sockets(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, protocol, address, port) of every listening TCP and bound UDP socket the
    processes hold, read from /proc (no psutil needed)."""
    import ipaddress
    import struct

    def decode(hex_addr: str) -> tuple[str, int]:
        host, port = hex_addr.split(":")
        raw = bytes.fromhex(host)
        words = struct.unpack("<" + "I" * (len(raw) // 4), raw)  # each 32-bit word is host-endian
        packed = struct.pack(">" + "I" * len(words), *words)
        ip = ipaddress.ip_address(packed)
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return str(ip), int(port, 16)

    found = []
    for pid in pids:
        inodes = set()
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # gone, or not ours
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        for proto in ("tcp", "tcp6", "udp", "udp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                listening = f[3] == "0A" if proto.startswith("tcp") else True
                if f[9] in inodes and listening:
                    found.append((pid, proto, *decode(f[1])))
    return found


def cli_trial_plan(monkeypatch, path: Path, config: str = "a"):
    """The plan that ``archsearch trial PATH --config CONFIG --device cpu`` hands to
    ``archsearch.trial.run_trial``, training stopped before it starts."""
    from typer.testing import CliRunner

    import archsearch.trial
    from archsearch.cli import app

    seen = []

    class Planned(Exception):
        """The plan is all the caller needs: stop before training."""

    def run_trial(plan, **kw):
        seen.append(plan)
        raise Planned

    monkeypatch.setattr(archsearch.trial, "run_trial", run_trial)
    r = CliRunner().invoke(app, ["trial", str(path), "--config", config, "--device", "cpu", "--quiet"])
    assert isinstance(r.exception, Planned), r.output
    (plan,) = seen
    return plan
