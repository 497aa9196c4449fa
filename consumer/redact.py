"""Removal of secrets from text before it reaches logs, errors or CLI output."""

from __future__ import annotations

import re

# SharedAccessKey=..., SharedAccessSignature=..., sig=... (SAS tokens), AccountKey=...
_SECRET_PATTERNS = (
    re.compile(r"(?i)(SharedAccessKey\s*=\s*)[^;\s\"']+"),
    re.compile(r"(?i)(SharedAccessSignature\s*=?\s*)[^;\s\"']+"),
    re.compile(r"(?i)(\bsig=)[^&;\s\"']+"),
    re.compile(r"(?i)(AccountKey\s*=\s*)[^;\s\"']+"),
    re.compile(r"(?i)(\bBearer\s+)[A-Za-z0-9._~+/=-]+"),
)

REDACTED = "***"


def redact(text: str) -> str:
    """Return `text` with every key, signature and token value replaced by `***`."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda match: match.group(1) + REDACTED, text)
    return text
