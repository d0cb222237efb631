"""The store: round trip, rollback, format version, encoder checks, vector search, maintenance."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from store import Behavior, BehaviorBatch, Query, Store, StoreError
from store import id_sort_key
from store.db import FORMAT_VERSION, segments_to_merge


def _unit(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _items(user: str, n: int, dim: int = 8) -> list[Behavior]:
    return [
        Behavior(
            item_id=f"i{k}",
            user_id=user,
            task="LaMP-7",
            text=f"{user} item {k}",
            fields={"text": f"{user} item {k}", "score": k},
            timestamp=datetime(2024, 1, 1 + k),
            vector=_unit(hash((user, k)) % 1000, dim),
        )
        for k in range(n)
    ]


def _fill(store: Store, dim: int = 8) -> None:
    queries = [Query("q1", "alice", "LaMP-7", "rewrite this", "gold", "dev"), Query("q2", "bob", "LaMP-7", "x", None, "test")]
    store.ingest([_items("alice", 3, dim), _items("bob", 2, dim)], queries, {"alice": {"style": "caps"}, "bob": {}}, "enc", dim)


def test_round_trip(tmp_path):
    store = Store(tmp_path / "s")
    _fill(store)
    reopened = Store(tmp_path / "s")
    alice = reopened.get_user("alice")
    assert (alice.n_items, alice.n_queries, alice.metadata) == (3, 1, {"style": "caps"})
    assert alice.first_ts == datetime(2024, 1, 1) and alice.last_ts == datetime(2024, 1, 3)
    history = reopened.user_history("alice", with_vectors=True)
    assert [b.item_id for b in history] == ["i0", "i1", "i2"]
    assert history[1].fields == {"text": "alice item 1", "score": 1}
    assert history[0].encoder == "enc"
    np.testing.assert_allclose(history[2].vector, _items("alice", 3)[2].vector, rtol=1e-6)
    assert [q.query_id for q in reopened.user_queries("alice")] == ["q1"]
    assert reopened.user_queries("bob")[0].output is None
    assert [u.user_id for u in reopened.list_users()] == ["alice", "bob"]
    assert reopened.encoder() == ("enc", 8)


def test_reingest_updates_instead_of_duplicating(tmp_path):
    store = Store(tmp_path / "s")
    _fill(store)
    changed = _items("alice", 3)
    changed[0].text = "edited"
    store.ingest([changed], [Query("q1", "alice", "LaMP-7", "new input", "gold", "dev")], {"alice": {}}, "enc", 8)
    assert store.count("behaviors") == 5 and store.count("queries") == 2 and store.count("users") == 2
    assert store.user_history("alice")[0].text == "edited"
    assert store.user_queries("alice")[0].input == "new input"


def test_an_ingest_of_known_and_new_users_keeps_one_row_each(tmp_path):
    store = Store(tmp_path / "s")
    _fill(store)  # alice (3 items), bob (2)
    store.ingest([_items("alice", 4), _items("carol", 2)], [], {"alice": {"team": "a"}, "carol": {"team": "c"}}, "enc", 8)
    users = {u.user_id: u for u in store.list_users()}
    assert sorted(users) == ["alice", "bob", "carol"] and store.count("users") == 3
    assert (users["alice"].n_items, users["alice"].n_queries, users["alice"].metadata) == (4, 1, {"style": "caps", "team": "a"})
    assert (users["carol"].n_items, users["carol"].metadata) == (2, {"team": "c"})
    assert users["bob"].n_items == 2


def test_failure_midway_rolls_every_table_back(tmp_path):
    store = Store(tmp_path / "s")
    _fill(store)
    before = _snapshot(store)

    def broken():
        yield _items("carol", 2)
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        store.ingest(broken(), [Query("q9", "carol", "LaMP-7", "y")], {"carol": {}}, "enc", 8)
    assert _snapshot(store) == before


def test_items_written_as_columns_read_back_like_records_and_a_ragged_batch_changes_nothing(tmp_path):
    records, columns = Store(tmp_path / "records"), Store(tmp_path / "columns")
    _fill(records)
    alice, bob = _items("alice", 3), _items("bob", 2)
    queries = [Query("q1", "alice", "LaMP-7", "rewrite this", "gold", "dev"), Query("q2", "bob", "LaMP-7", "x", None, "test")]
    batch = BehaviorBatch.of(alice + bob, np.stack([b.vector for b in alice + bob]))
    columns.ingest([batch], queries, {"alice": {"style": "caps"}, "bob": {}}, "enc", 8)
    assert _snapshot(columns) == _snapshot(records)
    for user in ("alice", "bob"):
        a, b = records.user_history(user, with_vectors=True), columns.user_history(user, with_vectors=True)
        assert [(x.item_id, x.fields, x.timestamp) for x in a] == [(x.item_id, x.fields, x.timestamp) for x in b]
        np.testing.assert_array_equal(np.stack([x.vector for x in a]), np.stack([x.vector for x in b]))
    before = _snapshot(columns)
    ragged = BehaviorBatch(["i9", "i10"], ["carol", "carol"], ["LaMP-7"], ["a", "b"], np.zeros((2, 8), np.float32))
    with pytest.raises(StoreError, match="a batch of 2 items has 1 tasks"):
        columns.ingest([ragged], [], {"carol": {}}, "enc", 8)
    assert _snapshot(columns) == before


def test_failure_on_a_new_store_leaves_no_tables(tmp_path):
    store = Store(tmp_path / "s")

    def broken():
        raise ValueError("bad")
        yield  # pragma: no cover

    with pytest.raises(ValueError):
        store.ingest(broken(), [], {"a": {}}, "enc", 8)
    assert store.table_names() == []


def test_unknown_format_version_is_a_clear_error(tmp_path):
    store = Store(tmp_path / "s")
    _fill(store)
    with store.transaction():
        store._set_meta({"format_version": str(FORMAT_VERSION + 98)})
    with pytest.raises(StoreError, match=f"format version {FORMAT_VERSION + 98}"):
        Store(tmp_path / "s")


def test_a_store_whose_first_write_is_not_an_ingest_opens_again(tmp_path):
    from store import Piece

    store = Store(tmp_path / "s")
    store.add_pool_version([Piece("LaMP-7", "a", "m", 1, 1.0, "llm", b"x", 1)], ["pool-1"])
    assert Store(tmp_path / "s").pool_tags() == {"pool-1": store.pool_tags()["pool-1"]}


def test_foreign_lancedb_directory_is_refused(tmp_path):
    lancedb.connect(tmp_path / "other").create_table("things", data=pa.table({"x": [1]}))
    with pytest.raises(StoreError, match="not a persona store"):
        Store(tmp_path / "other")


def test_vectors_of_another_encoder_are_refused(tmp_path):
    store = Store(tmp_path / "s")
    _fill(store)
    before = _snapshot(store)
    with pytest.raises(StoreError, match="encoder 'enc'"):
        store.ingest([_items("carol", 1)], [], {"carol": {}}, "other-encoder", 8)
    with pytest.raises(StoreError, match="16-d"):
        store.check_encoder("enc", 16)
    assert _snapshot(store) == before


def test_search_stays_inside_one_users_history(tmp_path):
    store = Store(tmp_path / "s")
    _fill(store)
    target = store.user_history("bob", with_vectors=True)[1]
    hits = store.search_history("bob", target.vector, k=5)
    assert [h.item.user_id for h in hits] == ["bob", "bob"]
    assert hits[0].item.item_id == target.item_id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score >= hits[1].score


def test_a_search_writes_nothing_to_stderr(tmp_path):
    """LanceDB's Rust logger writes past Python's sys.stderr, so only another process shows it
    (it warned once per search while the hit columns left out _distance)."""
    store = Store(tmp_path / "s")
    _fill(store)
    script = f"""
import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from store import Store
store = Store({str(tmp_path / "s")!r})
target = store.user_history("bob", with_vectors=True)[0]
print(len(store.search_history("bob", target.vector, k=2)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "2", "")


def test_a_reader_sees_another_process_commit_after_the_refresh_interval(tmp_path):
    """A reader keeps its open tables (and their caches) while their committed version stays,
    and sees another process's commit once READ_REFRESH_S has passed."""
    from store import db

    reader = Store(tmp_path / "s")
    _fill(reader)
    queries = reader._open("queries")
    assert reader.count("users") == 2 and len(reader.search_history("alice", _unit(1, 8), k=5)) == 3
    script = f"""
import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from store import Store
from test_store import _items
Store({str(tmp_path / "s")!r}).ingest([_items("alice", 5)], [], {{"alice": {{}}}}, "enc", 8)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    time.sleep(db.READ_REFRESH_S + 0.1)
    assert len(reader.search_history("alice", _unit(1, 8), k=9)) == 5 and reader.get_user("alice").n_items == 5
    assert reader._open("queries") is queries  # not written: the same handle


def test_info_and_optimize(tmp_path):
    store = Store(tmp_path / "s")
    _fill(store)
    store.ingest([_items("carol", 2)], [], {"carol": {}}, "enc", 8)
    info = store.info()
    rows = {t["table"]: t["rows"] for t in info["tables"]}
    assert rows == {"behaviors": 7, "queries": 2, "users": 3}
    assert info["format_version"] == FORMAT_VERSION and info["encoder"] == "enc" and info["disk_bytes"] > 0
    result = store.optimize(prune_versions=True)
    assert result["disk_bytes_after"] > 0
    assert {t["table"]: t["rows"] for t in store.info()["tables"]} == rows
    assert all(t["versions"] >= 1 for t in store.info()["tables"])


def _snapshot(store: Store) -> dict:
    users = store.list_users()
    return {
        "users": [u.__dict__ for u in users],
        "items": {u.user_id: [(b.item_id, b.text) for b in store.user_history(u.user_id)] for u in users},
        "queries": {u.user_id: [q.__dict__ for q in store.user_queries(u.user_id)] for u in users},
        "counts": {name: store.count(name) for name in ("users", "behaviors", "queries")},
    }


def test_items_without_time_keep_their_file_order_and_histories_read_in_one_scan(tmp_path):
    """Positional ids '#0'..'#11' order numerically (recency depends on it), not as text."""
    store = Store(tmp_path / "s")
    items = [Behavior(f"#{k}", "carol", "LaMP-7", f"tweet {k}", {"text": f"tweet {k}"}, None, _unit(k)) for k in range(12)]
    store.ingest([items[::-1]], [], {"carol": {}}, "enc", 8)
    _fill(store)
    assert [b.item_id for b in store.user_history("carol")] == [f"#{k}" for k in range(12)]
    both = store.histories(["carol", "alice", "nobody"], "LaMP-7")
    assert set(both) == {"carol", "alice"} and [b.text for b in both["carol"]][-1] == "tweet 11"
    assert [q.query_id for q in store.task_queries("LaMP-7")] == ["q1", "q2"]
    assert sorted(["u_10", "u_2", "10", "9", "#12", "#2"], key=id_sort_key) == ["9", "10", "#2", "#12", "u_2", "u_10"]


def _ingest_twice_at_once(store: Path, users: Path) -> None:
    """Two `persona ingest` processes started together on the same store; both must succeed."""
    command = [sys.executable, "-c", "from persona_cli.main import app; app()", "--store", str(store), "ingest", str(users), "--task", "LaMP-7"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err


def test_two_ingests_at_once_neither_duplicate_nor_erase_each_other(tmp_path):
    """The writer lock serializes whole commands: into an empty store the same 3 users land once,
    and into a non-empty one the second writer's rollback point is the first writer's commit."""
    from conftest import EXAMPLES

    lines = EXAMPLES.read_text(encoding="utf-8").splitlines()
    (tmp_path / "three.jsonl").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    (tmp_path / "six.jsonl").write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    items = lambda n: sum(len(json.loads(line)["history"]) for line in lines[:n])  # noqa: E731
    store = tmp_path / "store"
    _ingest_twice_at_once(store, tmp_path / "three.jsonl")
    opened = Store(store)
    assert (opened.count("users"), opened.count("behaviors"), opened.count("queries")) == (3, items(3), 9)
    _ingest_twice_at_once(store, tmp_path / "six.jsonl")
    opened = Store(store)
    assert (opened.count("users"), opened.count("behaviors"), opened.count("queries")) == (6, items(6), 18)
    assert len(opened.histories([str(u) for u in range(6)])["5"]) == len(json.loads(lines[5])["history"])


def test_nested_transactions_in_one_process_do_not_wait_for_themselves(tmp_path):
    store = Store(tmp_path / "s")
    with store.transaction():
        with store.transaction():
            store._set_meta({"format_version": str(FORMAT_VERSION)})
    assert store.meta()["format_version"] == str(FORMAT_VERSION)


_KILLED_MIDWAY = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_store import _items
from store import Query, Store
from store.schemas import PIECES
store = Store({uri!r})
with store.transaction():
    store._upsert_behaviors([_items("mallory", 4)], "enc", 8)
    store._upsert_queries([Query("q9", "mallory", "LaMP-7", "x", "y", "dev")])
    store._open_or_create("pieces", PIECES)  # a table this store never had
    store._refresh_users({{"mallory"}}, {{"mallory": {{}}}})
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 between table writes, before the command's commit
"""


def test_a_writer_killed_between_table_writes_is_invisible_and_undone_by_the_next(tmp_path):
    """kill -9 inside a command: readers keep the last complete state (no half-written user, no
    table the dead command created), and the next writer restores that state before its own writes."""
    store = Store(tmp_path / "s")
    _fill(store)
    before = _snapshot(store)
    script = _KILLED_MIDWAY.format(tests=str(Path(__file__).parent), uri=str(tmp_path / "s"))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert lancedb.connect(str(tmp_path / "s")).open_table("behaviors").count_rows() == 5 + 4  # the dead writer did write
    reader = Store(tmp_path / "s")
    assert _snapshot(reader) == before and "pieces" not in reader.table_names()
    assert reader.info()["tables"] == Store(tmp_path / "s").info()["tables"]
    reader.ingest([_items("carol", 2)], [], {"carol": {}}, "enc", 8)  # the next command heals, then writes
    after = Store(tmp_path / "s")
    assert [u.user_id for u in after.list_users()] == ["alice", "bob", "carol"]
    assert after.count("behaviors") == 7 and after.count("queries") == 2
    assert "pieces" not in lancedb.connect(str(tmp_path / "s")).list_tables().tables


def test_per_user_reads_go_through_user_id_indexes_kept_up_to_date(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    store.ingest([_items("10", 3)], [], {"10": {}}, "enc", 8)
    store.ingest([_items("2", 2)], [], {"2": {}}, "enc", 8)
    table = lancedb.connect(str(tmp_path / "s")).open_table("behaviors")
    [index] = table.list_indices()
    stats = table.index_stats(index.name)
    assert (index.columns, stats.num_unindexed_rows, stats.num_indices) == (["user_id"], 0, 1)  # two equal writes: merged
    monkeypatch.setattr("store.db.MERGE_CAP_ROWS", 0)  # nothing may be merged: the next write is a delta of its own
    store.ingest([_items("x-1", 1)], [], {"x-1": {}}, "enc", 8)
    stats = lancedb.connect(str(tmp_path / "s")).open_table("behaviors").index_stats(index.name)
    assert (stats.num_unindexed_rows, stats.num_indices) == (0, 2)
    assert store.ensure_indexes() == ["behaviors.user_id btree", "users.user_id btree"]
    assert [h.item_id for h in store.histories(["2"])["2"]] == [b.item_id for b in _items("2", 2)]
    store.optimize()
    table = lancedb.connect(str(tmp_path / "s")).open_table("behaviors")
    assert table.index_stats(index.name).num_indices == 1  # optimize merges the deltas
    assert [h.item_id for h in store.histories(["10"])["10"]] == [b.item_id for b in _items("10", 3)]
    assert [u.user_id for u in store.list_users()] == ["2", "10", "x-1"]  # natural order, not "10" < "2"
    assert [u.user_id for u in store.list_users(limit=1, offset=1)] == ["10"]
    numeric = Store(tmp_path / "n")
    numeric.ingest([_items(str(u), 1) for u in (100, 9, 30)], [], {"100": {}, "9": {}, "30": {}}, "enc", 8)
    assert [u.user_id for u in numeric.list_users()] == ["9", "30", "100"]


def test_a_reader_sees_a_commit_of_its_own_process_at_once(tmp_path):
    reader, writer = Store(tmp_path / "s"), Store(tmp_path / "s")
    _fill(writer)
    assert reader.count("users") == 2  # its snapshot of committed versions is refreshed by the write
    writer.ingest([_items("carol", 1)], [], {"carol": {}}, "enc", 8)
    assert reader.count("users") == 3 and reader.get_user("carol").n_items == 1


def test_index_segments_merge_as_a_binary_counter_up_to_the_cap():
    """Equal writes merge pairwise (N writes leave about log2(N) segments, so a lookup probes few),
    a small write beside large segments stays a segment of its own (a write costs its own rows),
    and no merge makes a segment past the cap (merge memory stays bounded)."""
    sizes: list[float] = []
    for _ in range(8):
        merge = segments_to_merge(sizes, 10, cap=1000)
        sizes = sizes[: len(sizes) - merge] + [10 + sum(sizes[len(sizes) - merge :])]
    assert sizes == [80]
    assert segments_to_merge([80, 40], 5, cap=1000) == 0
    assert segments_to_merge([80, 40, 10], 10, cap=1000) == 1
    assert segments_to_merge([40, 20, 10], 10, cap=1000) == 3
    assert segments_to_merge([40, 20, 10], 10, cap=45) == 2
