"""The codecs' one error type (beside the codec package's modules, which all raise it)."""
from __future__ import annotations

from edgeqtl.errors import EdgeqtlError


class CodecError(EdgeqtlError, ValueError):
    """Codes or bytes that do not fit the levels, shape or model given."""
