"""Look components up by name; an unknown name fails at once and lists the valid ones."""

from typing import Any, Mapping


def lookup(table: Mapping[str, Any], name: str, what: str) -> Any:
    """Returns table[name], or raises ValueError naming `what` and the valid choices."""
    try:
        return table[name]
    except (KeyError, TypeError):
        valid = ', '.join(sorted(table))
        raise ValueError(f'unknown {what} {name!r}; valid: {valid}') from None
