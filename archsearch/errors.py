"""Errors a user can act on. The CLI prints them without a traceback and exits with 2."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """Bad input or a missing resource the user must fix; exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in a space file, an override or an argument, all listed at once."""

    def __init__(self, problems: Iterable[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return f"{head}{self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{head}{len(self.problems)} problems:\n{lines}"

    def with_source(self, source: str) -> "ConfigError":
        return ConfigError(self.problems, source)


class DataUnavailable(UserError):
    """A data source, tokenizer or embedding cannot be read (offline, missing file, ...)."""


class DataCorrupted(Exception):
    """A prepared-data folder or a run-cache entry fails its fingerprint check."""


class FitError(UserError, ValueError):
    """A scaling fit was asked of input that cannot be fitted."""


class NonFiniteLoss(RuntimeError):
    """A training loss turned NaN or Inf; the run cannot give a meaningful PPL."""
