"""SQL filter fragments for LanceDB queries, with values quoted safely."""

from __future__ import annotations

from typing import Iterable


def sql_str(value: str) -> str:
    """A single-quoted SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def in_list(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(sql_str(v) for v in values)})"
