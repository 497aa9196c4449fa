"""Link address and token audience parsing."""

from __future__ import annotations


def entity_path(address: str | None) -> str:
    """Strip `amqps://host:port/` from a link address, leaving the entity path."""
    text = address or ""
    if "://" in text:
        text = text.split("://", 1)[1]
        text = text.split("/", 1)[1] if "/" in text else ""
    return text.strip("/")


def audience_path(audience: str) -> str:
    """Return the lower-case entity a token audience grants, "" for the namespace."""
    return entity_path(audience).split("/", 1)[0].lower()
