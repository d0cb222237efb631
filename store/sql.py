"""SQL filters for LanceDB queries (values quoted safely), the one way tables are scanned, and id order."""

from __future__ import annotations

import re
from typing import Any, Iterable

import pyarrow as pa


def sql_str(value: str) -> str:
    """A single-quoted SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def in_list(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(sql_str(v) for v in values)})"


def scan(table: Any, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All rows matching a SQL filter (all rows without one; no row limit), optionally only some columns."""
    query = table.search()
    if where:
        query = query.where(where)
    query = query.limit(None)
    if columns is not None:
        query = query.select(columns)
    return query.to_arrow()


def id_sort_key(value: str) -> tuple[tuple[int, int, str], ...]:
    """Natural order: digit runs compare as numbers, so '2' < '10', '#2' < '#12' (positional ids
    of items that came without one) and 'u_2' < 'u_10' (LaMP's per-profile item ids)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", value) if part)
