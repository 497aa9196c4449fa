"""The handler and harness examples of README.md, executed as written there."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_handler_and_test_examples() -> None:
    blocks = python_blocks()

    assert len(blocks) == 2
    assert "@app.handler" in blocks[0]
    assert "ConsumerTestHarness" in blocks[1]


async def test_readme_examples_run() -> None:
    handler_block, test_block = python_blocks()
    namespace: dict[str, Any] = {}

    exec(compile(handler_block, str(README), "exec"), namespace)
    exec(compile(test_block, str(README), "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]

    assert len(tests) == 1
    await tests[0]()


async def test_readme_handler_dead_letters_unsupported_country() -> None:
    handler_block, _ = python_blocks()
    namespace: dict[str, Any] = {}
    exec(compile(handler_block, str(README), "exec"), namespace)
    from consumer.testing import ConsumerTestHarness, make_event

    harness = ConsumerTestHarness(namespace["app"])
    event = make_event("ORDER_CREATED", "order-2")
    event["payload"]["shippingAddress"]["country"] = "BR"
    result = await harness.deliver(event)

    assert result.dead_lettered_with("UnsupportedCountry")
