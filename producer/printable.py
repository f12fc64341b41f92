"""Text from Redis or a request, made safe to print on one line of a log or a terminal.

Keys, URIs, ids and messages may hold newlines (which would forge lines in a worker log
or in ``audioq status``), terminal escape sequences (which rewrite what is on screen) or
other invisible characters (bidi overrides, U+2028). Everything that prints such text
goes through ``printable``, which writes every character Python does not call printable
as its backslash escape, the way ``repr`` does, and leaves the rest alone.
"""

from __future__ import annotations


def printable(text: object, keep: str = "") -> str:
    """``text`` with each non-printable character (except those in ``keep``) as a ``\\x..``/``\\u..`` escape."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii")
                   for c in text)
