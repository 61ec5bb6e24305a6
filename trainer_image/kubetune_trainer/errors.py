"""The trainer's user-fixable error, importable without torch (the data stage never loads it)."""

from __future__ import annotations


class BadInput(Exception):
    """The spec or the data is wrong; retrying cannot help."""
