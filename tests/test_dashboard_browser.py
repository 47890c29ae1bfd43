"""optuna-dashboard in a real headless Chromium (Debian's): the study, a trial's artifact and
the note written by archsearch are on the pages; screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import ROOT, cli, tiny_space, write_space

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
ARTIFACTS = ROOT / "test-artifacts"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(url: str, user_dir, screenshot=None) -> str:
    """The page's DOM after its scripts ran (and optionally a screenshot)."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_dir}", "--virtual-time-budget=15000", "--window-size=1400,1800"]  # fmt: skip
    if screenshot:
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout


def test_dashboard_shows_study_artifact_and_note(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, study={"name": "browsed"}))
    r = cli("run", str(space), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "archsearch.cli", "dashboard", "--storage", f"sqlite:///{home / 'archsearch.db'}",
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                studies = json.loads(urllib.request.urlopen(f"{base}/api/studies", timeout=2).read())["study_summaries"]
                break
            except OSError:
                time.sleep(0.2)
        sid = next(s["study_id"] for s in studies if s["study_name"] == "browsed")
        ARTIFACTS.mkdir(exist_ok=True)
        study_dom = chromium(f"{base}/dashboard/studies/{sid}", tmp_path / "u1", ARTIFACTS / "dashboard_study.png")
        assert "browsed" in study_dom
        assert "Validation PPL vs training tokens" in study_dom  # archsearch's study-level graph
        trials_dom = chromium(f"{base}/dashboard/studies/{sid}/trials", tmp_path / "u2", ARTIFACTS / "dashboard_trials.png")
        assert "trial_0_a_scaling.png" in trials_dom and "trial_0_a_sizes.csv" in trials_dom  # the trial's artifacts
        note_dom = chromium(f"{base}/dashboard/studies/{sid}/note", tmp_path / "u3", ARTIFACTS / "dashboard_note.png")
        assert "Summary" in note_dom and "Recommendation" in note_dom  # the summary note
        for png in ("dashboard_study.png", "dashboard_trials.png", "dashboard_note.png"):
            assert (ARTIFACTS / png).read_bytes()[:4] == b"\x89PNG"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
