"""Shared access signature checks for CBS put-token requests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, quote_plus

SAS_PREFIX = "SharedAccessSignature "


@dataclass(frozen=True)
class SharedAccessKey:
    """The key name and key that tokens must be signed with."""

    name: str
    key: str


def verify_sas_token(
    token: str, key: SharedAccessKey, now_s: float | None = None
) -> str:
    """Check a SAS token's signature, key name and expiry; return its audience.

    Raises `ValueError` with a reason that never contains the token or the key.
    """
    if not token.startswith(SAS_PREFIX):
        raise ValueError("the token is not a shared access signature")
    fields = parse_qs(token[len(SAS_PREFIX) :], keep_blank_values=True)
    values = {name: items[0] for name, items in fields.items() if items}
    missing = [name for name in ("sr", "sig", "se") if name not in values]
    if missing:
        raise ValueError(f"the token lacks the field(s) {', '.join(missing)}")
    if values.get("skn") != key.name:
        raise ValueError("the token names no or an unknown shared access key (skn)")
    try:
        expiry = int(values["se"])
    except ValueError:
        raise ValueError("the token expiry (se) is not an integer") from None
    if expiry < (time.time() if now_s is None else now_s):
        raise ValueError("the token has expired")
    to_sign = f"{quote_plus(values['sr'])}\n{expiry}".encode()
    digest = hmac.new(key.key.encode(), to_sign, hashlib.sha256).digest()
    expected = base64.b64encode(digest).decode()
    if not hmac.compare_digest(expected, values["sig"]):
        raise ValueError("the token signature does not match the configured key")
    return values["sr"]
