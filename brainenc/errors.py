"""Errors for bad configuration values (the CLI prints them without a traceback)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is out of range or unknown.

    The message names the option (as written in a YAML config or on the command line), what was
    expected and what was found.
    """

    input_error = True

    def __init__(self, field: str, expected: str, found):
        self.field, self.expected, self.found = field, expected, found
        super().__init__(f"option '{field}': expected {expected}, found {found!r}")
