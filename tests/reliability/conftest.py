"""Fixtures of the reliability tests."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def short_dir():
    """A folder short enough for Ray's unix socket paths (pytest's tmp_path is not): a Ray
    temp folder or a home that Ray should use without a link."""
    folder = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
