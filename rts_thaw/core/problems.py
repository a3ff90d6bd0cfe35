"""One way to report every problem found in an input: a single message that lists them all."""

from __future__ import annotations


def listed(problems: list[str], limit: int | None = None) -> str:
    """The problem itself, or "N problems: a; b; ..." (the first `limit` of them, if given)."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(problems[:limit])
