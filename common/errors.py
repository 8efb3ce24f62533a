"""Errors raised on bad input, always naming where the problem is and what was expected."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file is missing, malformed or inconsistent.

    The message always names the file, the line (1-based, when one applies)
    and what was expected there.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.detail = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ConfigError(ValueError):
    """A configuration value is missing or outside its allowed values."""
