"""The plug-ins table: trained adapters and embedders with their config, weights and training metrics."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from store import schemas
from store.errors import StoreError
from store.records import Plugin
from store.sql import id_sort_key, in_list, scan, sql_str as _q

PLUGINS = "plugins"
_LISTED = ["name", "kind", "task", "user_id", "llm", "encoder", "base", "config", "metrics", "created_at"]


class PluginTables:
    """Mixed into Store: one batched write per call, reads by name, kind or name prefix."""

    def put_plugins(self, plugins: list[Plugin]) -> None:
        """Insert or replace plug-ins by name, all in one write."""
        if not plugins:
            return
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        rows = [_row(p, now) for p in plugins]
        with self.transaction():
            table = self._open_or_create(PLUGINS, schemas.PLUGINS)
            data = pa.Table.from_pylist(rows, schema=schemas.PLUGINS)
            table.merge_insert(schemas.PLUGIN_KEY).when_matched_update_all().when_not_matched_insert_all().execute(data)

    def get_plugin(self, name: str) -> Plugin:
        """One plug-in with its weights; a clear error when there is none of that name."""
        found = self.get_plugins([name])
        if name not in found:
            raise StoreError(f"no plug-in '{name}' in store {self.uri} (see `persona plugins list`)")
        return found[name]

    def get_plugins(self, names: list[str]) -> dict[str, Plugin]:
        """The plug-ins of these names that exist, with their weights."""
        table = self._open(PLUGINS)
        if table is None or not names:
            return {}
        rows = scan(table, in_list("name", names))
        return {p.name: p for p in _plugins(rows, with_weights=True)}

    def list_plugins(self, kind: Optional[str] = None, prefix: Optional[str] = None) -> list[Plugin]:
        """Plug-ins without their weights (size filled in), in name order."""
        table = self._open(PLUGINS)
        if table is None:
            return []
        where = [f"kind = {_q(kind)}"] if kind else []
        if prefix:
            where.append(f"starts_with(name, {_q(prefix)})")
        rows = scan(table, " AND ".join(where) or None, columns=[*_LISTED, "weights"])
        plugins = _plugins(rows, with_weights=False)
        return sorted(plugins, key=lambda p: id_sort_key(p.name))

    def delete_plugins(self, names: list[str]) -> int:
        """Remove plug-ins by name; returns how many existed."""
        table = self._open(PLUGINS)
        if table is None or not names:
            return 0
        existing = scan(table, in_list("name", names), columns=["name"]).num_rows
        if existing:
            with self.transaction():
                table.delete(in_list("name", names))
        return existing


def _row(plugin: Plugin, now: datetime) -> dict[str, Any]:
    row = {k: v for k, v in plugin.__dict__.items() if k != "size"}
    row["config"] = json.dumps(plugin.config, sort_keys=True, ensure_ascii=False)
    row["metrics"] = json.dumps(plugin.metrics, sort_keys=True)
    row["created_at"] = plugin.created_at or now
    return row


def _plugins(rows: pa.Table, with_weights: bool) -> list[Plugin]:
    sizes = pc.binary_length(rows.column("weights")).to_pylist()
    columns = _LISTED + (["weights"] if with_weights else [])
    plugins = []
    for row, size in zip(rows.select(columns).to_pylist(), sizes):
        row["config"] = json.loads(row["config"] or "{}")
        row["metrics"] = json.loads(row["metrics"] or "{}")
        plugins.append(Plugin(**{"weights": b"", **row}, size=size or 0))
    return plugins
