"""Secrets are removed from any text before it is logged or shown."""

from __future__ import annotations

import pytest

from consumer.redact import redact

KEY = "dGhpcy1pcy1hLWZha2Uta2V5LWZvci10ZXN0cw=="


@pytest.mark.parametrize(
    "text",
    [
        f"Endpoint=sb://h/;SharedAccessKeyName=root;SharedAccessKey={KEY}",
        f"SharedAccessSignature sr=sb%3a%2f%2fh&sig={KEY}&se=1&skn=root",
        f"AccountKey={KEY};EndpointSuffix=x",
        f"Authorization: Bearer {KEY}",
        f"error connecting with 'SharedAccessKey={KEY}'",
    ],
)
def test_redact_removes_key(text: str) -> None:
    assert KEY not in redact(text)


def test_redact_keeps_other_text() -> None:
    text = f"Endpoint=sb://h/;SharedAccessKeyName=root;SharedAccessKey={KEY}"

    assert (
        redact(text) == "Endpoint=sb://h/;SharedAccessKeyName=root;SharedAccessKey=***"
    )
