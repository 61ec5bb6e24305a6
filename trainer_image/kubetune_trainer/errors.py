"""The trainer's user-fixable error, importable without torch (the data stage never loads it)."""

from __future__ import annotations


class BadInput(Exception):
    """The spec or the data is wrong; retrying cannot help. `findings`: the dataset policy's, as dicts
    (severity, code, message), recorded with the failure so that status.data can hold them."""

    def __init__(self, message: str, findings: list[dict] | None = None) -> None:
        super().__init__(message)
        self.findings = list(findings or [])
