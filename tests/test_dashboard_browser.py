"""optuna-dashboard in a real headless Chromium (Debian's), for a grid and for a TPE study:
the study graph with interval bands, each trial's note (config, alpha +- interval, PPL at the
target +- interval, the per-size table), its plot opening full size, study user attributes
without the signature, the trial list labelled with config names, and the trial table
(optuna-dashboard's "Smart Selection" page; its old /trialTable address is sent there) with
a config_name column and rows that fit on the screen. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

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
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
        assert screenshot.read_bytes()[:4] == b"\x89PNG"
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


@contextmanager
def dashboard(home):
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "archsearch.cli", "dashboard", "--storage", f"sqlite:///{home / 'archsearch.db'}",
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{base}/api/studies", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def api(base: str, path: str):
    return json.loads(urllib.request.urlopen(f"{base}{path}", timeout=30).read())


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def check_study(tmp_path, home, study: str, tag: str) -> None:
    with dashboard(home) as base:
        sid = next(s["study_id"] for s in api(base, "/api/studies")["study_summaries"] if s["study_name"] == study)
        detail = api(base, f"/api/studies/{sid}")
        # user attributes readable: the signature is kept elsewhere (a system attribute)
        assert detail["union_user_attrs"] and not any("signature" in a["key"] for a in detail["union_user_attrs"])
        ARTIFACTS.mkdir(exist_ok=True)

        study_dom = chromium(f"{base}/dashboard/studies/{sid}", tmp_path / "u1", ARTIFACTS / f"dashboard_{tag}_study.png")
        assert study in study_dom
        assert "Validation PPL vs training tokens" in study_dom  # archsearch's study-level graph
        assert "95% band" in study_dom  # with each config's interval band

        trials = [t for t in detail["trials"] if t["state"] == "Complete"]
        for t in trials[:2]:
            name = next(a["value"] for a in t["user_attrs"] if a["key"] == "config_name")
            dom = chromium(f"{base}/dashboard/studies/{sid}/trials?numbers={t['number']}", tmp_path / f"u_{t['number']}",
                           ARTIFACTS / f"dashboard_{tag}_trial_{t['number']}.png")  # fmt: skip
            assert f"trial_{t['number']}_{name}_scaling.png" in dom and f"trial_{t['number']}_{name}_sizes.csv" in dom
            # the note: config name, alpha with its interval, PPL at the target with its interval, the table
            assert f">{name}</h2>" in dom, name
            assert re.search(r"α = -?\d+\.\d{4}</strong> \(95% interval \[", dom)
            assert "PPL at 10,000,000 tokens" in dom and "Val PPL" in dom
            # the plot is a link to the full-size image, which the dashboard serves
            src = re.search(rf'<img [^>]*src="(/artifacts/{sid}/{t["trial_id"]}/[0-9a-f-]+)"', dom)
            assert src, "no plot image in the note"
            width, height = png_size(urllib.request.urlopen(base + src.group(1), timeout=30).read())
            assert width >= 600 and height >= 400
            assert f'href="{src.group(1)}"' in dom

        # the trial list names each trial's config ("Trial N · name")
        names = {t["number"]: next(a["value"] for a in t["user_attrs"] if a["key"] == "config_name") for t in detail["trials"]
                 if any(a["key"] == "config_name" for a in t["user_attrs"])}  # fmt: skip
        assert names and all(f"Trial {n} \u00b7 {name}</" in dom for n, name in names.items()), re.findall(r"Trial \d+[^<]*", dom)

        # the trial table: its old address is sent to it; config_name is a column, every trial a row
        table_dom = chromium(f"{base}/dashboard/studies/{sid}/trialTable", tmp_path / "u4", ARTIFACTS / f"dashboard_{tag}_table.png")
        assert ">UserAttribute config_name<" in table_dom and ">UserAttribute sizes<" not in table_dom
        header = re.findall(r">((?:Param|UserAttribute) [^<]+)<", table_dom)
        assert header.index("UserAttribute config_name") == sum(h.startswith("Param ") for h in header)  # right after the params
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", table_dom)
        assert all(name in cells for name in names.values()) and max(map(len, cells)) <= 80  # no cell of thousands of characters

        note_dom = chromium(f"{base}/dashboard/studies/{sid}/note", tmp_path / "u3", ARTIFACTS / f"dashboard_{tag}_note.png")
        assert "Summary" in note_dom and "Recommendation" in note_dom  # the summary note


def test_dashboard_views_of_a_grid(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, study={"name": "browsed"}))
    r = cli("run", str(space), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    check_study(tmp_path, home, "browsed", "grid")


@pytest.mark.slow
def test_dashboard_views_of_a_tpe_search(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = tiny_space(tiny_corpus, study={"name": "searched"}, sampler={"type": "tpe", "seed": 0, "n_startup_trials": 2},
                       parameters={"num_layers": {"type": "int", "low": 1, "high": 3}, "context_dim": [4, 8, 12]},
                       warm_start={"configs": {"warm": {"num_layers": 2, "context_dim": 8}}}, n_trials=2)  # fmt: skip
    r = cli("run", str(write_space(tmp_path / "s.yaml", space)), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    check_study(tmp_path, home, "searched", "tpe")
