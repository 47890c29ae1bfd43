"""A real 2-node Ray cluster on this machine (`ray start` twice): trials land on both nodes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import cli, tiny_space, write_space
from optuna.trial import TrialState

RAY = str(Path(sys.executable).parent / "ray")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """Head + one worker node, 1 CPU each, token authentication on (Ray's default)."""
    env = dict(os.environ, RAY_AUTH_MODE="token")
    port = _port()
    common = ["--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common], env=env, check=True, capture_output=True)
    try:
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common], env=env, check=True, capture_output=True)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)


@pytest.mark.slow
def test_study_on_a_two_node_cluster(tmp_path, tiny_corpus, cluster):
    address, env = cluster
    configs = {f"c{i}": {"num_layers": 1 + i % 2, "context_dim": 8 * (1 + i // 2)} for i in range(4)}
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, sampler={"type": "grid", "configs": configs},
                                                         max_concurrent=2, phase2={"batch_size": 32, "max_epochs": 6}))  # fmt: skip
    r = cli("run", str(space), "--address", address, "--quiet", env={"ARCHSEARCH_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": env["RAY_AUTH_MODE"]})
    assert r.returncode == 0, r.stdout + r.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'home' / 'archsearch.db'}").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    nodes = {t.user_attrs["ray_node"] for t in trials}
    assert len(nodes) == 2, nodes  # both nodes ran trials


def test_bad_cluster_address_is_a_usage_error(tmp_path, tiny_corpus):
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    r = cli("run", str(space), "--address", f"127.0.0.1:{_port()}", env={"ARCHSEARCH_HOME": str(tmp_path / "home")}, timeout=300)
    assert r.returncode == 2 and "--address" in r.stderr, r.stderr
    assert not (tmp_path / "home" / "archsearch.db").exists()
