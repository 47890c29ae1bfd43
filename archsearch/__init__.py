"""archsearch: architecture search with scaling-law objectives for the CVFP language model.

The Python API (imported lazily: ``import archsearch`` loads neither torch, Ray nor Optuna)::

    import archsearch
    summary = archsearch.run("spaces/quickstart.yaml")   # the summary `archsearch run --json` writes
    df = archsearch.results("quickstart")                # pandas: one row per trial x size
    law = archsearch.fit([1000, 2000, 4000], [900.0, 700.0, 560.0])   # ScalingFit
    archsearch.__version__
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__", "fit", "load", "results", "run"]


def _version() -> str:
    """The installed distribution's version; in a source tree that is not installed (no
    package metadata on the path: a GPU host running a copied checkout), pyproject.toml's
    version marked ``+src`` (``0.1.0+src``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("archsearch")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
        except OSError:
            m = None
        return f"{m.group(1)}+src" if m else "0+unknown"


__version__ = _version()


def __getattr__(name: str) -> Any:
    if name in ("run", "results", "fit", "load"):
        from archsearch import api

        return getattr(api, name)
    raise AttributeError(f"module 'archsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
