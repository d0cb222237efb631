"""The shared piece pool (a versioned, tagged table) and the target users' assemblies against it.

Every registration of sharers writes its pieces in one commit and tags that table version
`pool-N`; an assembly records the version it read, so it can be rebuilt exactly after the pool
has grown. Older versions stay readable through their tags.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from store import schemas
from store.errors import StoreError
from store.records import AssemblyRecord, Piece, PoolVersion
from store.sql import id_sort_key, in_list, scan, sql_str as _q

PIECES, ASSEMBLIES = "pieces", "assemblies"
_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
_PIECE_LISTED = [f.name for f in schemas.PIECES if f.name != "tensors"]


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def check_tag(tag: str) -> None:
    if not _TAG.match(tag) or re.fullmatch(r"v?\d+", tag):
        raise StoreError(f"tag '{tag}': use letters, digits, '.', '_' or '-', starting with a letter (and not a version like v3)")


class PieceTables:
    """Mixed into Store: the pieces pool with its versions and tags, and the assemblies table."""

    # ---------- the pool ----------

    def add_pool_version(self, pieces: list[Piece], tags: list[str]) -> PoolVersion:
        """Write pieces (replacing a sharer's earlier piece of the same task and module) in one
        commit and tag the new table version with every tag in `tags`."""
        if not pieces:
            raise StoreError("no pieces to register")
        known = self.pool_tags()
        for tag in tags:
            check_tag(tag)
            if tag in known:
                raise StoreError(f"pool tag '{tag}' exists (version {known[tag]})")
        now = _now()
        rows = [_piece_row(p, now) for p in pieces]
        with self.transaction():
            table = self._open_or_create(PIECES, schemas.PIECES)
            data = pa.Table.from_pylist(rows, schema=schemas.PIECES)
            table.merge_insert(schemas.PIECE_KEY).when_matched_update_all().when_not_matched_insert_all().execute(data)
            version = table.version
            for tag in tags:
                table.tags.create(tag, version)
        return PoolVersion(version=version, tags=sorted(tags), created_at=now)

    def pool_tags(self) -> dict[str, int]:
        """Every tag of the pieces table and the version it names."""
        table = self._open(PIECES)
        if table is None:
            return {}
        tags = {tag: int(info["version"]) for tag, info in table.tags.list().items()}
        return {tag: version for tag, version in tags.items() if version <= table.version}  # none of an unfinished command

    def pool_versions(self) -> list[PoolVersion]:
        """The tagged versions of the pool, oldest first."""
        table = self._open(PIECES)
        if table is None:
            return []
        by_version: dict[int, list[str]] = {}
        for tag, version in self.pool_tags().items():
            by_version.setdefault(version, []).append(tag)
        stamps = {v["version"]: v["timestamp"] for v in table.list_versions()}
        return [
            PoolVersion(version=v, tags=sorted(tags, key=id_sort_key), created_at=stamps.get(v))
            for v, tags in sorted(by_version.items())
        ]

    def resolve_pool(self, ref: Optional[str] = None) -> PoolVersion:
        """The pool version a reference names: a tag, a version number ('12' or 'v12'), or
        (None) the newest tagged version."""
        versions = self.pool_versions()
        if not versions:
            raise StoreError(f"store {self.uri} has no piece pool yet (run `persona register-sharers`)")
        if ref is None:
            return versions[-1]
        for pool in versions:
            if ref in pool.tags:
                return pool
        number = ref[1:] if ref.startswith("v") else ref
        if number.isdigit():
            table = self._open(PIECES)
            if int(number) in {v["version"] for v in table.list_versions()}:
                tags = next((p.tags for p in versions if p.version == int(number)), [])
                return PoolVersion(version=int(number), tags=tags)
            raise StoreError(f"the pool has no version {number}")
        raise StoreError(f"no pool tag '{ref}' (see `persona pool list`)")

    def tag_pool(self, version: int, tag: str) -> None:
        """Name a pool version with one more tag."""
        check_tag(tag)
        known = self.pool_tags()
        if tag in known:
            raise StoreError(f"pool tag '{tag}' exists (version {known[tag]})")
        with self.transaction():
            table = self._open(PIECES)
            if table is None:
                raise StoreError(f"store {self.uri} has no piece pool yet")
            table.tags.create(tag, version)

    def pool_pieces(self, version: int, task: Optional[str] = None, with_tensors: bool = True) -> list[Piece]:
        """The pieces as they were at one pool version (sizes filled in), by sharer and module."""
        table = self._open_at(PIECES, version)
        if table is None:
            return []
        columns = _PIECE_LISTED + ["tensors"]
        rows = scan(table, f"task = {_q(task)}" if task else None, columns)
        sizes = pc.binary_length(rows.column("tensors")).to_pylist()
        selected = rows.select(columns if with_tensors else _PIECE_LISTED).to_pylist()
        pieces = [_piece(row, size) for row, size in zip(selected, sizes)]
        keys = {name: id_sort_key(name) for name in {p.sharer_id for p in pieces} | {p.module for p in pieces}}
        return sorted(pieces, key=lambda p: (p.task, keys[p.sharer_id], keys[p.module]))

    # ---------- assemblies ----------

    def put_assemblies(self, records: list[AssemblyRecord]) -> None:
        """Insert or replace assemblies by (task, user, pool version), in one write."""
        if not records:
            return
        now = _now()
        rows = [{**r.__dict__, "config": json.dumps(r.config, sort_keys=True), "created_at": r.created_at or now} for r in records]
        with self.transaction():
            table = self._open_or_create(ASSEMBLIES, schemas.ASSEMBLIES)
            data = pa.Table.from_pylist(rows, schema=schemas.ASSEMBLIES)
            table.merge_insert(schemas.ASSEMBLY_KEY).when_matched_update_all().when_not_matched_insert_all().execute(data)

    def get_assemblies(self, task: str, user_ids: list[str], pool_version: int) -> dict[str, AssemblyRecord]:
        """These users' assemblies against one pool version (users without one are absent)."""
        table = self._open(ASSEMBLIES)
        if table is None or not user_ids:
            return {}
        where = f"task = {_q(task)} AND pool_version = {int(pool_version)} AND {in_list('user_id', sorted(set(user_ids)))}"
        return {r["user_id"]: _assembly(r) for r in scan(table, where).to_pylist()}

    def list_assemblies(self, task: Optional[str] = None, user_id: Optional[str] = None) -> list[AssemblyRecord]:
        """Stored assemblies (newest pool version last), optionally of one task or user."""
        table = self._open(ASSEMBLIES)
        if table is None:
            return []
        where = [f"task = {_q(task)}"] if task else []
        if user_id is not None:
            where.append(f"user_id = {_q(user_id)}")
        records = [_assembly(r) for r in scan(table, " AND ".join(where) or None).to_pylist()]
        return sorted(records, key=lambda r: (r.task, id_sort_key(r.user_id), r.pool_version))


def _piece_row(piece: Piece, now: datetime) -> dict[str, Any]:
    row = {k: v for k, v in piece.__dict__.items() if k != "size"}
    row["config"] = json.dumps(piece.config, sort_keys=True)
    row["metrics"] = json.dumps(piece.metrics, sort_keys=True)
    row["created_at"] = piece.created_at or now
    return row


def _piece(row: dict[str, Any], size: int) -> Piece:
    row["config"] = json.loads(row["config"] or "{}")
    row["metrics"] = json.loads(row["metrics"] or "{}")
    return Piece(**{"tensors": b"", **row}, size=size or 0)


def _assembly(row: dict[str, Any]) -> AssemblyRecord:
    return AssemblyRecord(**{**row, "config": json.loads(row["config"] or "{}")})
