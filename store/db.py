"""The Store: opening, format versioning, cross-table rollback, and the typed reads and writes."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import platformdirs

from store import schemas
from store.errors import StoreError
from store.records import Behavior, BehaviorBatch, Query, SearchHit, UserRow
from store.pieces import PieceTables
from store.plugins import PluginTables
from store.results import ResultTables
from store.sql import id_sort_key as _id_sort_key, in_list as _in_list, scan as _scan, sql_str as _sql_str

FORMAT_VERSION = 1
"""The on-disk layout this code reads and writes; bumped whenever a schema changes."""

META, USERS, BEHAVIORS, QUERIES = "_meta", "users", "behaviors", "queries"
COMMITS = "_commits"
"""One row: the version of every table as the last complete writing command left it. Readers see
the store at those versions, so a command killed between two table writes is invisible to them."""
WRITER_LOCK = ".persona-writer.lock"
_held: dict[str, int] = {}  # store directory -> depth of this process's nested transactions
_writes: dict[str, int] = {}  # store directory -> transactions this process has finished on it
READ_REFRESH_S = 0.5
"""Outside its own writes a Store looks up which table versions are committed at most this often
(and at once after any write of this process): another process's commit shows within this time,
and a per-user read does not pay two table opens and a commit lookup (about 2 ms) every time."""
_held_guard = threading.Lock()


@contextmanager
def _writer_lock(uri: str) -> Iterator[bool]:
    """One writer at a time on a local store, across processes: an exclusive flock on a file in the
    store directory, waited for (not refused), re-entrant within a process; yields whether this is
    the outermost hold. Two concurrent commands then run one after the other, so neither duplicates
    rows nor rolls back the other's commit. Object-store URIs have no file lock; there writers must
    not overlap."""
    local = "://" not in uri
    key = _lock_key(uri)
    with _held_guard:
        outermost = not _held.get(key)
        _held[key] = _held.get(key, 0) + 1
    handle = None
    try:
        if outermost and local:
            os.makedirs(key, exist_ok=True)
            handle = open(os.path.join(key, WRITER_LOCK), "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield outermost
    finally:
        with _held_guard:
            _held[key] -= 1
        if handle is not None:
            handle.close()  # closing the file releases its flock


def _lock_key(uri: str) -> str:
    return os.path.abspath(uri) if "://" not in uri else uri


def _count_write(uri: str) -> None:
    """This process changed the store: every Store of it reads afresh."""
    key = _lock_key(uri)
    with _held_guard:
        _writes[key] = _writes.get(key, 0) + 1


def _holds_writer_lock(uri: str) -> bool:
    key = _lock_key(uri)
    with _held_guard:
        return bool(_held.get(key))


def default_store_path() -> str:
    """PERSONA_STORE if set, else a per-user application data directory."""
    env = os.environ.get("PERSONA_STORE")
    if env:
        return env
    return str(Path(platformdirs.user_data_dir("persona")) / "store")


def _user_filter(user_id: str, task: str | None) -> str:
    """SQL filter for one user's rows, optionally of one task."""
    where = f"user_id = {_sql_str(user_id)}"
    return where + f" AND task = {_sql_str(task)}" if task else where


@dataclass
class _ReadSnapshot:
    """What a Store's reads see until it is refreshed: when it was taken, this process's write count
    then, the tables that existed, their committed versions (None: a store from before commit
    records) and the handles opened at those versions."""

    taken_at: float
    writes: int
    names: set[str]
    committed: dict[str, int] | None
    handles: dict[str, Any]


class Store(ResultTables, PluginTables, PieceTables):
    """One LanceDB directory or object-store URI (s3://, gs://, az://) holding everything persona keeps.

    Object-store credentials and endpoint come from the usual environment variables
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT, AWS_REGION, ...) or `storage_options`
    (LanceDB's keys: aws_access_key_id, endpoint, region, allow_http, ...); they are never printed."""

    def __init__(self, uri: str | os.PathLike[str] | None = None, storage_options: dict[str, str] | None = None) -> None:
        self.uri = str(uri) if uri is not None else default_store_path()
        self.storage_options = dict(storage_options or {})
        self._commit_cache: tuple[int, dict[str, int]] | None = None
        self._snapshot: _ReadSnapshot | None = None
        try:
            self._db = lancedb.connect(self.uri, storage_options=self.storage_options or None, session=_session())
            self._check_format()
        except (ValueError, OSError, RuntimeError) as exc:
            if not _is_object_store_failure(exc):
                raise
            raise StoreError(object_store_problem(self.uri, exc, self.storage_options)) from None

    # ---------- tables, versions, commits ----------

    def _all_tables(self) -> list[str]:
        names: list[str] = []
        token = None
        while True:
            page = self._db.list_tables(page_token=token, limit=1000)
            names.extend(page.tables)
            token = page.page_token
            if not token:
                return sorted(names)

    def _writing(self) -> bool:
        """Inside this process's transaction on this store: reads see its own uncommitted writes."""
        return _holds_writer_lock(self.uri)

    def _committed(self, names: list[str]) -> dict[str, int] | None:
        """Table versions of the last complete command; None for a store written before commit
        records existed (then every table's latest version counts as committed)."""
        if COMMITS not in names:
            return None
        table = self._db.open_table(COMMITS)
        if self._commit_cache is None or self._commit_cache[0] != table.version:  # read it once per commit
            rows = table.to_arrow().to_pylist()
            self._commit_cache = (table.version, json.loads(rows[0]["versions"]) if rows else {})
        return self._commit_cache[1]

    def table_names(self) -> list[str]:
        """Names of the tables that exist as of the last complete command (the internal meta
        table included); inside a transaction, also those it created."""
        names = self._all_tables()
        visible = [n for n in names if n != COMMITS]
        committed = None if self._writing() else self._committed(names)
        return visible if committed is None else [n for n in visible if n in committed]

    def _open(self, name: str):
        """The table as the last complete command left it (None if it did not exist then);
        inside a transaction, its latest version."""
        if self._writing():
            return self._db.open_table(name) if name in self._all_tables() else None
        snapshot = self._read_snapshot()
        names, committed, handles = snapshot.names, snapshot.committed, snapshot.handles
        if name not in handles:
            table = None
            if name in names and (committed is None or name in committed):
                table = self._db.open_table(name)
                if committed is not None and table.version != committed[name]:
                    table.checkout(committed[name])
            handles[name] = table
        return handles[name]

    def _read_snapshot(self) -> _ReadSnapshot:
        """Which tables and versions readers see, with the handles opened at them (see READ_REFRESH_S)."""
        key = _lock_key(self.uri)
        now, writes = time.monotonic(), _writes.get(key, 0)
        if self._snapshot is None or now - self._snapshot.taken_at > READ_REFRESH_S or self._snapshot.writes != writes:
            names = self._all_tables()
            committed = self._committed(names)
            self._snapshot = _ReadSnapshot(now, writes, set(names), committed, self._unchanged_handles(committed))
        return self._snapshot

    def _unchanged_handles(self, committed: dict[str, int] | None) -> dict[str, Any]:
        """The open handles whose committed version has not changed since the last lookup: kept,
        with the caches they have filled (a committed table is never dropped, so a name and
        version are always the same content)."""
        if self._snapshot is None or committed is None or self._snapshot.committed is None:
            return {}
        before, handles = self._snapshot.committed, self._snapshot.handles
        return {n: h for n, h in handles.items() if h is not None and n in committed and before.get(n) == committed[n]}

    def _open_at(self, name: str, version: int):
        """A handle of its own on an older version of a table (the shared handle stays at the
        version every other read sees), or None if the table does not exist."""
        if self._open(name) is None:
            return None
        table = self._db.open_table(name)
        table.checkout(version)
        return table

    def _open_or_create(self, name: str, schema: pa.Schema):
        table = self._open(name)
        if table is None:
            table = self._db.create_table(name, schema=schema)
        return table

    def _check_format(self) -> None:
        names = self.table_names()
        if not names:
            return
        if META not in names:
            raise StoreError(f"{self.uri} holds LanceDB tables but is not a persona store (no {META} table)")
        version = self.meta().get("format_version")
        if version != str(FORMAT_VERSION):
            raise StoreError(
                f"{self.uri} has store format version {version}; this persona reads version {FORMAT_VERSION}"
            )

    def meta(self) -> dict[str, str]:
        """The store's key/value facts: format version, behaviour encoder id and vector width."""
        table = self._open(META)
        if table is None:
            return {}
        return {r["key"]: r["value"] for r in table.to_arrow().to_pylist()}

    def _set_meta(self, values: dict[str, str]) -> None:
        table = self._open_or_create(META, schemas.META)
        rows = pa.table({"key": list(values), "value": list(values.values())}, schema=schemas.META)
        table.merge_insert("key").when_matched_update_all().when_not_matched_insert_all().execute(rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All of the block's writes or none: a block that raises rolls every table back, and only
        a block that finishes records its table versions as the store's committed state. A process
        killed inside the block never reaches that record: readers keep seeing the previous
        state, and the next writer first restores it (`_recover`). Holds the store's writer lock
        throughout; nested blocks commit with the outermost one."""
        with _writer_lock(self.uri) as outermost:
            if outermost:
                self._recover()
            before = self._latest_versions()
            try:
                if outermost and META not in before:  # a new store: its first write says what it is
                    self._set_meta({"format_version": str(FORMAT_VERSION)})
                yield
                if outermost:
                    self._record_commit()
                    _count_write(self.uri)
            except BaseException as exc:
                self._roll_back(before)
                _count_write(self.uri)
                if _is_object_store_failure(exc):
                    raise StoreError(object_store_problem(self.uri, exc, self.storage_options) + "; nothing was changed") from None
                if _is_io_failure(exc):  # a full disk, a read-only or vanished directory: the user's to fix
                    raise StoreError(f"store {self.uri}: could not write ({_first_line(exc)}); nothing was changed") from None
                raise

    def _latest_versions(self) -> dict[str, int]:
        return {name: self._db.open_table(name).version for name in self._all_tables() if name != COMMITS}

    def _recover(self) -> None:
        """Undo what a killed writer left beyond the committed state; a new store gets its first
        (empty) commit record before anything else is written."""
        names = self._all_tables()
        committed = self._committed(names)
        if committed is None and not names:
            self._record_commit()
        elif committed is not None:
            self._roll_back(committed)

    def _roll_back(self, versions: dict[str, int]) -> None:
        """Every table back to these versions: tables not listed are dropped, tags of later
        versions deleted, changed tables restored (a restore is a new version with the old content)."""
        for name in self._all_tables():
            if name == COMMITS:
                continue
            if name not in versions:
                self._db.drop_table(name)
                continue
            table = self._db.open_table(name)
            for tag, info in table.tags.list().items():
                if int(info["version"]) > versions[name]:
                    table.tags.delete(tag)
            if table.version != versions[name]:
                table.checkout(versions[name])
                table.restore()

    def _record_commit(self) -> None:
        row = pa.table({"versions": [json.dumps(self._latest_versions(), sort_keys=True)]})
        if COMMITS in self._all_tables():
            self._db.open_table(COMMITS).add(row, mode="overwrite")
        else:
            self._db.create_table(COMMITS, data=row)

    # ---------- the behaviour encoder of this store ----------

    def encoder(self) -> tuple[str, int] | None:
        """(encoder id, vector width) that every vector in this store was made with, if any."""
        meta = self.meta()
        if "encoder" not in meta:
            return None
        return meta["encoder"], int(meta["encoder_dim"])

    def check_encoder(self, encoder_id: str, dim: int) -> None:
        """Refuse to mix vectors of two encoders in one store."""
        known = self.encoder()
        if known is not None and known != (encoder_id, dim):
            raise StoreError(
                f"store {self.uri} holds vectors of encoder '{known[0]}' ({known[1]}-d); "
                f"'{encoder_id}' ({dim}-d) cannot be used with them (pass --encoder {known[0]} or use another --store)"
            )

    # ---------- writes ----------

    def ingest(
        self,
        behavior_batches: Iterable[list[Behavior] | BehaviorBatch],
        queries: list[Query],
        user_metadata: dict[str, dict[str, Any]],
        encoder_id: str,
        dim: int,
    ) -> dict[str, int]:
        """Upsert history items (streamed: lists of records, or columns for bulk writers), queries
        and users in one rollback-safe unit.

        Items are keyed by (user, task, item id) and queries by (task, query id), so re-ingesting
        the same ids updates rows instead of duplicating them.
        """
        self.check_encoder(encoder_id, dim)
        with self.transaction():
            self._set_meta({"format_version": str(FORMAT_VERSION), "encoder": encoder_id, "encoder_dim": str(dim)})
            touched = set(user_metadata)
            existing = {u.user_id: u for u in self.get_users(sorted(touched))}
            fresh = not any(u.n_items for u in existing.values())  # a user's items always come with their row
            n_items, appended = self._upsert_behaviors(behavior_batches, encoder_id, dim, touched if fresh else None)
            n_queries = self._upsert_queries(queries)
            self._refresh_users(touched, user_metadata, appended, existing)
            self.ensure_indexes()
        return {"users": len(touched), "items": n_items, "queries": n_queries}

    def ensure_indexes(self) -> list[str]:
        """The scalar indexes every per-user read filters by: user_id on the history, the queries and
        the users (a per-user read of unindexed rows scans them all). A write that left rows
        outside an index indexes them merged with only the newest, smaller segments (_index_new_rows),
        so a write's time and memory follow its own rows, not the table, while the segments a
        lookup probes stay few; `optimize` merges them all. Per-user
        vector search stays exact: it ranks only the user's own rows, found through the user_id
        index, so no ANN index is made."""
        from lancedb.index import BTree

        made = []
        for name in (BEHAVIORS, QUERIES, USERS):
            table = self._open(name)
            if table is None or table.count_rows() == 0:
                continue
            current = [index for index in table.list_indices() if index.columns == ["user_id"]]
            if not current:
                with self.transaction():
                    table.create_index("user_id", config=BTree())
            elif current[0].num_unindexed_rows:
                with self.transaction():
                    _index_new_rows(table, current[0].name)
            made.append(f"{name}.user_id btree")
        return made

    def _upsert_behaviors(
        self, batches: Iterable[list[Behavior] | BehaviorBatch], encoder_id: str, dim: int, fresh_users: set[str] | None = None
    ) -> tuple[int, pa.Table | None]:
        """Upsert items; returns how many, and when they were appended, their (user_id, timestamp)
        columns. `fresh_users`, users none of whom has a stored item yet (a first ingest, new
        users), have their items appended, which needs no join against the existing keys: time and
        memory stay those of the new rows however large the table, and the users' statistics come
        from the rows written, not from a scan."""
        schema = schemas.behaviors(dim)
        table = self._open_or_create(BEHAVIORS, schema)
        append = fresh_users is not None
        count = 0
        failure: list[BaseException] = []
        written: list[pa.RecordBatch] = []
        allowed = pa.array(list(fresh_users), pa.string()) if append else None  # is_in needs no order

        def arrow_batches() -> Iterator[pa.RecordBatch]:
            nonlocal count
            try:
                for chunk in batches:
                    if len(chunk):
                        batch = _behaviors_to_arrow(chunk, schema, encoder_id, dim)
                        if append and not pc.all(pc.is_in(batch.column("user_id"), value_set=allowed)).as_py():
                            raise ValueError("Store.ingest: an item's user is not among the users given in user_metadata")
                        count += len(chunk)
                        if append:
                            written.append(batch.select(["user_id", "timestamp"]))
                        yield batch
            except BaseException as exc:  # re-raised below with its own type, not LanceDB's wrapper
                failure.append(exc)
                raise

        reader = pa.RecordBatchReader.from_batches(schema, arrow_batches())
        try:
            if append:
                table.add(reader)
            else:
                (
                    table.merge_insert(schemas.BEHAVIOR_KEY)
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute(reader)
                )
        except Exception:
            if failure:
                raise failure[0] from None
            raise
        if not append:
            return count, None
        return count, pa.Table.from_batches(written, schema=pa.schema([schema.field("user_id"), schema.field("timestamp")]))

    def _upsert_queries(self, queries: list[Query]) -> int:
        if not queries:
            return 0
        table = self._open_or_create(QUERIES, schemas.QUERIES)
        rows = pa.Table.from_pylist([q.__dict__ for q in queries], schema=schemas.QUERIES)
        table.merge_insert(schemas.QUERY_KEY).when_matched_update_all().when_not_matched_insert_all().execute(rows)
        return len(queries)

    def _refresh_users(
        self, user_ids: set[str], metadata: dict[str, dict[str, Any]], items: pa.Table | None = None,
        existing: dict[str, UserRow] | None = None,
    ) -> None:  # fmt: skip
        """Recount items, queries and time span of these users from what is stored now (`items`:
        all their stored items' user_id and timestamp, when the caller has them; else read;
        `existing`: their user rows as they were, when the caller has read them)."""
        if not user_ids:
            return
        if items is None:
            items = self._column_scan(BEHAVIORS, ["user_id", "timestamp"], user_ids)
        stats: dict[str, dict[str, Any]] = {}
        if items is not None and items.num_rows:
            grouped = items.group_by("user_id").aggregate(
                [("user_id", "count"), ("timestamp", "min"), ("timestamp", "max")]
            )
            for row in grouped.to_pylist():
                stats[row["user_id"]] = row
        queries = self._column_scan(QUERIES, ["user_id"], user_ids)
        n_queries: dict[str, int] = {}
        if queries is not None and queries.num_rows:
            for row in queries.group_by("user_id").aggregate([("user_id", "count")]).to_pylist():
                n_queries[row["user_id"]] = row["user_id_count"]
        if existing is None:
            existing = {u.user_id: u for u in self.get_users(sorted(user_ids))}
        rows = []
        for uid in sorted(user_ids):
            old = existing.get(uid)
            meta = dict(old.metadata) if old else {}
            meta.update(metadata.get(uid, {}))
            s = stats.get(uid, {})
            rows.append(
                {
                    "user_id": uid,
                    "n_items": s.get("user_id_count", 0),
                    "n_queries": n_queries.get(uid, 0),
                    "first_ts": s.get("timestamp_min"),
                    "last_ts": s.get("timestamp_max"),
                    "profile": old.profile if old else None,
                    "metadata": json.dumps(meta, ensure_ascii=False, sort_keys=True),
                }
            )
        table = self._open_or_create(USERS, schemas.USERS)
        new = [row for row in rows if row["user_id"] not in existing]
        if new:  # appended: a merge would join them against every stored user id (memory grows with the table)
            table.add(pa.Table.from_pylist(new, schema=schemas.USERS))
        known = [row for row in rows if row["user_id"] in existing]
        if known:
            data = pa.Table.from_pylist(known, schema=schemas.USERS)
            table.merge_insert(schemas.USER_KEY).when_matched_update_all().when_not_matched_insert_all().execute(data)

    def _column_scan(self, name: str, columns: list[str], user_ids: set[str]) -> pa.Table | None:
        table = self._open(name)
        if table is None:
            return None
        return _scan(table, _in_list("user_id", sorted(user_ids)), columns)

    # ---------- reads ----------

    def count(self, name: str) -> int:
        table = self._open(name)
        return 0 if table is None else table.count_rows()

    def list_users(self, limit: int | None = None, offset: int = 0) -> list[UserRow]:
        """Users sorted by id (numeric ids in numeric order)."""
        table = self._open(USERS)
        if table is None:
            return []
        ids = _scan(table, None, ["user_id"]).column("user_id")
        end = None if limit is None else offset + limit
        page = _natural_page(ids, offset, end)
        found = {u.user_id: u for u in self.get_users(page)}
        return [found[u] for u in page]

    def get_users(self, user_ids: list[str]) -> list[UserRow]:
        table = self._open(USERS)
        if table is None or not user_ids:
            return []
        data = _scan(table, _in_list("user_id", user_ids))
        return [_user_from_row(r) for r in data.to_pylist()]

    def require_users(self, user_ids: list[str]) -> None:
        """A clear error naming the first of these users that the store does not hold."""
        known = {u.user_id for u in self.get_users(user_ids)}
        unknown = [u for u in user_ids if u not in known]
        if unknown:
            raise StoreError(f"no user '{unknown[0]}' in store {self.uri}")

    def get_user(self, user_id: str) -> UserRow | None:
        found = self.get_users([user_id])
        return found[0] if found else None

    def user_history(self, user_id: str, task: str | None = None, with_vectors: bool = False) -> list[Behavior]:
        """The user's items, oldest first (items without time keep their ingest order by id)."""
        table = self._open(BEHAVIORS)
        if table is None:
            return []
        where = _user_filter(user_id, task)
        columns = [f.name for f in table.schema if with_vectors or f.name != "vector"]
        data = _scan(table, where, columns)
        items = [_behavior_from_row(r) for r in data.to_pylist()]
        items.sort(key=_history_order)
        return items

    def histories(self, user_ids: list[str], task: str | None = None, with_vectors: bool = False) -> dict[str, list[Behavior]]:
        """Histories of many users in one scan, each oldest first (users without items are absent)."""
        table = self._open(BEHAVIORS)
        if table is None or not user_ids:
            return {}
        where = _in_list("user_id", sorted(set(user_ids))) + (f" AND task = {_sql_str(task)}" if task else "")
        columns = [f.name for f in table.schema if with_vectors or f.name != "vector"]
        grouped: dict[str, list[Behavior]] = {}
        for row in _scan(table, where, columns).to_pylist():
            item = _behavior_from_row(row)
            grouped.setdefault(item.user_id, []).append(item)
        for items in grouped.values():
            items.sort(key=_history_order)
        return grouped

    def task_queries(self, task: str) -> list[Query]:
        """Every stored query of one task, by user then query id."""
        table = self._open(QUERIES)
        if table is None:
            return []
        queries = [Query(**r) for r in _scan(table, f"task = {_sql_str(task)}").to_pylist()]
        queries.sort(key=lambda q: (_id_sort_key(q.user_id), _id_sort_key(q.query_id)))
        return queries

    def user_queries(self, user_id: str, task: str | None = None) -> list[Query]:
        table = self._open(QUERIES)
        if table is None:
            return []
        where = _user_filter(user_id, task)
        data = _scan(table, where)
        queries = [Query(**r) for r in data.to_pylist()]
        queries.sort(key=lambda q: _id_sort_key(q.query_id))
        return queries

    def search_history(
        self, user_id: str, vector: np.ndarray, k: int = 5, task: str | None = None
    ) -> list[SearchHit]:
        """Nearest items of one user's history by cosine, from LanceDB's vector search."""
        table = self._open(BEHAVIORS)
        if table is None:
            return []
        where = _user_filter(user_id, task)
        result = (
            table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
            .metric("cosine")
            .where(where, prefilter=True)
            .select([*_HIT_COLUMNS, "_distance"])  # no vector: half the bytes; _distance named, or Lance warns on stderr
            .limit(k)
            .to_arrow()
        )
        hits = []
        for row in result.to_pylist():
            distance = row.pop("_distance")
            hits.append(SearchHit(item=_behavior_from_row(row), score=1.0 - float(distance)))
        return hits

    # ---------- maintenance ----------

    def info(self) -> dict[str, Any]:
        """Per table: rows, current version, number of kept versions, bytes; plus the store's facts."""
        tables = []
        for name in self.table_names():
            if name == META:
                continue
            table = self._open(name)
            tables.append(
                {
                    "table": name,
                    "rows": table.count_rows(),
                    "version": table.version,
                    "versions": len(table.list_versions()),
                    "bytes": int(table.stats()["total_bytes"]),
                }
            )
        meta = self.meta()
        return {
            "uri": self.uri,
            "format_version": int(meta.get("format_version", FORMAT_VERSION)),
            "encoder": meta.get("encoder"),
            "encoder_dim": int(meta["encoder_dim"]) if "encoder_dim" in meta else None,
            "tables": tables,
            "disk_bytes": _disk_bytes(self.uri),
        }

    def optimize(self, prune_versions: bool = False) -> dict[str, Any]:
        """Compact small fragments and update indices; with prune_versions also drop the old versions of
        tables without tags (a tagged table, the piece pool, keeps its versions: assemblies name them)."""
        before = _disk_bytes(self.uri)
        kept = []
        with self.transaction():
            for name in self._all_tables():
                self._optimize_table(name, prune_versions, kept)
        return {"disk_bytes_before": before, "disk_bytes_after": _disk_bytes(self.uri), "versions_kept": kept}

    def _optimize_table(self, name: str, prune_versions: bool, kept: list[str]) -> None:
        table = self._db.open_table(name)
        for index in table.list_indices():  # the segments of earlier writes become one index again
            if index.num_segments > 1:
                _lance_dataset(table).optimize.optimize_indices(index_names=[index.name], num_indices_to_merge=index.num_segments)
                table = self._db.open_table(name)  # at the merged index's version: compacting from the older one conflicts with it
        if prune_versions and table.tags.list():  # tagged versions (pool-N) must stay readable
            kept.append(name)
            table.optimize()
        elif prune_versions:  # asked for explicitly: LanceDB's warning about concurrent readers is the CLI's help text
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                table.optimize(cleanup_older_than=timedelta(0), delete_unverified=True)
        else:
            table.optimize()


def _is_io_failure(exc: BaseException) -> bool:
    """An operating-system failure to write, as Python or LanceDB (a RuntimeError naming LanceError(IO)) reports it."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "LanceError(IO)" in str(exc))


CACHE_MIB = {"index": 256, "metadata": 128}
"""LanceDB's caches of index pages and table metadata per Store (its defaults, 6 GiB and 1 GiB,
let memory grow with the table as more of its index is read); PERSONA_INDEX_CACHE_MB and
PERSONA_METADATA_CACHE_MB change them."""


def _session() -> Any:
    """A LanceDB session (its caches) of bounded size. One per Store: a session also keeps its
    object-store clients, which must follow each Store's own endpoint and credentials."""
    return lancedb.Session(**_cache_sizes())


def _cache_sizes() -> dict[str, int]:
    index = int(os.environ.get("PERSONA_INDEX_CACHE_MB") or CACHE_MIB["index"])
    metadata = int(os.environ.get("PERSONA_METADATA_CACHE_MB") or CACHE_MIB["metadata"])
    return {"index_cache_size_bytes": index * 2**20, "metadata_cache_size_bytes": metadata * 2**20}


def _lance_dataset(table: Any) -> Any:
    """The Lance dataset under a LanceDB table (pylance), at the table's version, with the
    store's storage options and caches as bounded as LanceDB's (CACHE_MIB)."""
    return table.to_lance(**_cache_sizes())


MERGE_CAP_ROWS = 4_000_000
"""The largest index segment a write's merge makes (see _index_new_rows): merging costs memory in
proportion to the rows merged (a B-tree over 8.5M ids: 272 MiB above the process), so past this
size segments are left as they are and `persona store optimize` merges them."""


def _index_new_rows(table: Any, index: str) -> None:
    """Index the rows outside `index`, merged with the newest segments no larger than what is being
    merged so far (a binary counter over writes: N equal writes leave at most log2(N) + 1
    segments), up to MERGE_CAP_ROWS rows. Rebuilding the whole B-tree after every write grew with
    the table (over 8.5M ids: 3.65 s and 272 MiB above the process; a delta of 500,000 ids: 0.36 s
    and 95 MiB), and keeping every write's delta slowed each per-user lookup, which probes every
    segment: over 10M rows, counting a user's rows took 1.9-2.8 ms through 20 deltas against
    1.4-1.8 ms through one index (and 1.5-1.7 ms through the 4 segments this leaves)."""
    dataset = _lance_dataset(table)
    stats = dataset.stats.index_stats(index)
    merge = segments_to_merge(stats["num_indexed_rows_per_delta"], stats["num_unindexed_rows"], MERGE_CAP_ROWS)
    dataset.optimize.optimize_indices(index_names=[index], num_indices_to_merge=merge)


def segments_to_merge(sizes: list[float], new: float, cap: float) -> int:
    """How many of the newest index segments (rows in each, oldest first) to merge with `new` new
    rows: each next-newest one while it is at most 1.5x the run merged so far (equal writes
    merge pairwise) and the run stays within `cap` rows."""
    run, count = new, 0
    for size in reversed(sizes):
        if size > 1.5 * run or run + size > cap:
            break
        run, count = run + size, count + 1
    return count


def _natural_page(ids: pa.ChunkedArray, start: int, end: int | None) -> list[str]:
    """ids[start:end] in natural order (id_sort_key); all-digit ids, the common case at scale,
    are sorted in Arrow and only the page becomes Python strings."""
    if len(ids) and pc.all(pc.ascii_is_decimal(ids)).as_py() and pc.max(pc.utf8_length(ids)).as_py() <= 18:
        order = pc.sort_indices(pc.cast(ids, pa.int64()))
        return ids.take(order[start:end]).to_pylist()
    return sorted(ids.to_pylist(), key=_id_sort_key)[start:end]


def _is_object_store_failure(exc: BaseException) -> bool:
    """A failed request to an object store, as LanceDB reports it."""
    text = str(exc)
    return any(mark in text for mark in ("RetryError", "store: \"S3\"", "store: \"GCS\"", "store: \"MicrosoftAzure\"", "ObjectStore"))


def object_store_problem(uri: str, exc: BaseException, options: dict[str, str]) -> str:
    """One line saying what went wrong with an object store, without any credential."""
    text = str(exc)
    endpoint = options.get("endpoint") or options.get("aws_endpoint") or os.environ.get("AWS_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    where = f" at {endpoint}" if endpoint else ""
    bucket = uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else uri
    if "status: 404" in text or "NoSuchBucket" in text:
        return f"store {uri}: bucket '{bucket}' does not exist{where} (create it, or check the URI)"
    if any(code in text for code in ("status: 403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        return f"store {uri}: access denied{where} (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --storage-option)"
    return f"store {uri}: cannot reach the object store{where} (check AWS_ENDPOINT or --storage-option endpoint=..., and the network)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(", /")[0].removeprefix("lance error: ")  # drop the library's source location


def _behaviors_to_arrow(chunk: list[Behavior] | BehaviorBatch, schema: pa.Schema, encoder_id: str, dim: int) -> pa.RecordBatch:
    if not isinstance(chunk, BehaviorBatch):
        chunk = BehaviorBatch.of(chunk, np.stack([np.asarray(b.vector, dtype=np.float32) for b in chunk]))
    n = len(chunk)
    if chunk.vectors is None:
        raise StoreError(f"a batch of {n} items has no vectors")
    vectors = np.ascontiguousarray(chunk.vectors, dtype=np.float32)
    if vectors.shape != (n, dim):
        raise StoreError(f"vectors have shape {vectors.shape[1:]} but the store expects ({dim},)")
    for name in ("user_ids", "tasks", "texts", "fields", "timestamps"):
        column = getattr(chunk, name)
        if column is not None and len(column) != n:
            raise StoreError(f"a batch of {n} items has {len(column)} {name}")
    fields = ["{}"] * n if chunk.fields is None else [json.dumps(f, ensure_ascii=False) if f else "{}" for f in chunk.fields]
    columns = [
        pa.array(chunk.item_ids, pa.string()),
        pa.array(chunk.user_ids, pa.string()),
        pa.array(chunk.tasks, pa.string()),
        pa.array(chunk.texts, pa.string()),
        pa.array(fields, pa.string()),
        pa.nulls(n, schemas.TS) if chunk.timestamps is None else pa.array(chunk.timestamps, schemas.TS),
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim),
        pa.array([encoder_id] * n, pa.string()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


_HIT_COLUMNS = ["item_id", "user_id", "task", "text", "fields", "timestamp", "encoder"]


def _behavior_from_row(row: dict[str, Any]) -> Behavior:
    vector = row.get("vector")
    return Behavior(
        item_id=row["item_id"],
        user_id=row["user_id"],
        task=row["task"],
        text=row["text"],
        fields=json.loads(row["fields"]) if row.get("fields") else {},
        timestamp=row.get("timestamp"),
        vector=np.asarray(vector, dtype=np.float32) if vector is not None else None,
        encoder=row["encoder"],
    )


def _user_from_row(row: dict[str, Any]) -> UserRow:
    return UserRow(
        user_id=row["user_id"],
        n_items=int(row["n_items"] or 0),
        n_queries=int(row["n_queries"] or 0),
        first_ts=row["first_ts"],
        last_ts=row["last_ts"],
        profile=row["profile"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else {},
    )


def _history_order(item: Behavior) -> tuple:
    """Oldest first; items without a timestamp after those with one, in id order."""
    return (item.timestamp is None, item.timestamp or datetime.min, _id_sort_key(item.item_id))


def _disk_bytes(uri: str) -> int | None:
    """Bytes under a local store directory; None for object-store URIs."""
    if "://" in uri and not uri.startswith("file://"):
        return None
    root = Path(uri.removeprefix("file://"))
    if not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
