"""The plugins table: weights round-trip as bytes, listing leaves them out but knows their size,
prefixes are literal, replacing keeps one row, and a failed write changes nothing."""

from __future__ import annotations

import pytest

from store import Plugin, Store, StoreError


def _plugin(name: str, kind: str = "oppu", weights: bytes = b"\x00\x01", **extra) -> Plugin:
    return Plugin(name=name, kind=kind, llm="tiny", weights=weights, **extra)


def test_plugins_round_trip_and_list_without_weights(tmp_path):
    store = Store(tmp_path / "s")
    store.put_plugins([
        _plugin("oppu-T/u_1", config={"r": 8}, metrics={"train_seconds": 1.5}, user_id="u_1", base="task"),
        _plugin("oppu-T/u%2", weights=b"abcd"),
        _plugin("oppu-TX/3"),
        _plugin("task", kind="task-lora", weights=b"w" * 10),
    ])  # fmt: skip
    got = store.get_plugin("oppu-T/u_1")
    assert got.weights == b"\x00\x01" and got.config == {"r": 8} and got.metrics == {"train_seconds": 1.5}
    assert got.base == "task" and got.user_id == "u_1" and got.created_at is not None
    listed = store.list_plugins(prefix="oppu-T/")
    assert [(p.name, p.size, p.weights) for p in listed] == [("oppu-T/u%2", 4, b""), ("oppu-T/u_1", 2, b"")]
    assert [p.name for p in store.list_plugins(prefix="oppu-T/u%")] == ["oppu-T/u%2"]
    assert [p.name for p in store.list_plugins(kind="task-lora")] == ["task"]


def test_replacing_a_plugin_keeps_one_row_and_delete_removes_it(tmp_path):
    store = Store(tmp_path / "s")
    store.put_plugins([_plugin("a", weights=b"old")])
    store.put_plugins([_plugin("a", weights=b"new!")])
    assert [(p.name, p.size) for p in store.list_plugins()] == [("a", 4)]
    assert store.delete_plugins(["a", "missing"]) == 1
    assert store.list_plugins() == [] and store.get_plugins(["a"]) == {}


def test_a_missing_plugin_is_a_clear_error(tmp_path):
    store = Store(tmp_path / "s")
    with pytest.raises(StoreError, match="no plug-in 'nothing'"):
        store.get_plugin("nothing")
