"""The errors edgeqtl raises on purpose, in one place.

Two kinds:

- `EdgeqtlError`: the base of every error a user can cause and fix (a bad path, a wrong
  bundle, a corrupt frame, a dead broker, a refused request). Its message is one line
  saying what is wrong and how to fix it; the CLI prints exactly that line and exits 1.
  Anything else that escapes (a numpy or torch bug) keeps its traceback.
- `CodedError`: an error with a short machine-readable `code` (`bad_codes`,
  `fingerprint_mismatch`, `step_gap`, ...) beside its message. A server turns one into
  an ERROR frame (`edgeqtl.wire.error_frame`); the other side raises it again as a
  `RemoteError` (`edgeqtl.wire.raise_if_error`). The codes are listed in
  docs/PROTOCOL.md.
"""
from __future__ import annotations


class EdgeqtlError(Exception):
    """An error the user can fix; its message says what and how, in one line."""


class CodedError(EdgeqtlError):
    """An error with a code a program can branch on, and a message a person can act on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteError(CodedError):
    """The other side answered with an ERROR frame."""

    def __str__(self) -> str:
        return f"server refused the request ({self.code}): {self.message}"
