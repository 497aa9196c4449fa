"""Making producer-controlled text safe to print to a terminal.

Session ids, subjects, property values and bodies come from the producer
that sent the message.
Printed as they are, an ANSI escape sequence in them can clear the screen or forge
output, and a newline can forge a log line. `escape_controls` replaces every character
that `str.isprintable()` rejects with the escape that Python's `repr` uses, such as
`\\x1b` or `\\u202e`. Those are control characters such as ESC, format characters such
as bidirectional overrides, separators other than the ASCII space, and unassigned or
private-use code points. Rich console markup such as `[bold]` is a separate matter:
print such text as a `rich.text.Text`.
"""

from __future__ import annotations

# Characters that multi-line output such as a message body or a traceback keeps.
LINE_BREAKS = "\n\t"


def escape_controls(text: str, keep: str = "") -> str:
    """Return `text` with each non-printable character replaced by its escape.

    Characters in `keep` stay as they are, for example `LINE_BREAKS` for text that
    is printed over several lines. Backslashes are not escaped, so a literal `\\x1b`
    in `text` looks the same as an escaped ESC.
    """
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() or char in keep else repr(char)[1:-1]
        for char in text
    )
