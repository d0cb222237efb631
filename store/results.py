"""Tables of what the toolkit computed from the history: PAG profiles, training pairs, evaluation
runs and their predictions."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Optional

import pyarrow as pa

from store import schemas
from store.errors import StoreError
from store.records import HistoryPair, Prediction, Profile, Run
from store.sql import id_sort_key, in_list, scan, sql_str as _q

PROFILES, PAIRS, RUNS, PREDICTIONS = "profiles", "pairs", "runs", "predictions"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class ResultTables:
    """Mixed into Store: reads and writes of profiles, runs and predictions (one write per call)."""

    # ---------- PAG profiles ----------

    def get_profiles(self, user_ids: list[str], task: str, llm: str) -> dict[str, Profile]:
        """Cached profiles of these users for this task and LLM."""
        table = self._open(PROFILES)
        if table is None or not user_ids:
            return {}
        where = f"task = {_q(task)} AND llm = {_q(llm)} AND {in_list('user_id', user_ids)}"
        rows = scan(table, where).to_pylist()
        return {r["user_id"]: Profile(**r) for r in rows}

    def put_profiles(self, profiles: list[Profile]) -> None:
        """Upsert profiles by (user, task, LLM) and mirror the newest text into users.profile."""
        if not profiles:
            return
        rows = [{**p.__dict__, "created_at": p.created_at or _now()} for p in profiles]
        with self.transaction():
            table = self._open_or_create(PROFILES, schemas.PROFILES)
            data = pa.Table.from_pylist(rows, schema=schemas.PROFILES)
            table.merge_insert(schemas.PROFILE_KEY).when_matched_update_all().when_not_matched_insert_all().execute(data)
            users = self._open("users")
            if users is not None:
                updates = pa.table({"user_id": [p.user_id for p in profiles], "profile": [p.text for p in profiles]})
                users.merge_insert("user_id").when_matched_update_all().execute(updates)

    # ---------- training pairs made from history items ----------

    def get_pairs(self, user_ids: list[str], task: str, recipe: str) -> dict[str, list[HistoryPair]]:
        """Stored pairs of these users for this task made by `recipe`, per user."""
        table = self._open(PAIRS)
        found: dict[str, list[HistoryPair]] = {}
        if table is None or not user_ids:
            return found
        where = f"task = {_q(task)} AND recipe = {_q(recipe)} AND {in_list('user_id', user_ids)}"
        for row in scan(table, where).to_pylist():
            found.setdefault(row["user_id"], []).append(HistoryPair(**row))
        return found

    def put_pairs(self, pairs: list[HistoryPair]) -> None:
        """Upsert pairs by (user, task, item, recipe), in one write."""
        if not pairs:
            return
        rows = [{**p.__dict__, "created_at": p.created_at or _now()} for p in pairs]
        with self.transaction():
            table = self._open_or_create(PAIRS, schemas.PAIRS)
            data = pa.Table.from_pylist(rows, schema=schemas.PAIRS)
            table.merge_insert(schemas.PAIR_KEY).when_matched_update_all().when_not_matched_insert_all().execute(data)

    # ---------- evaluation runs ----------

    def next_run_id(self) -> str:
        """Runs are numbered 1, 2, 3, … in the order they were stored."""
        table = self._open(RUNS)
        if table is None:
            return "1"
        ids = scan(table, columns=["run_id"]).column("run_id").to_pylist()
        return str(max((int(i) for i in ids if i.isdigit()), default=0) + 1)

    def save_run(self, run: Run, predictions: list[Prediction], profiles: Optional[list[Profile]] = None) -> Run:
        """Store a run, all its predictions and the PAG profiles it wrote together (all or
        nothing); assigns the run id."""
        with self.transaction():
            self.put_profiles(profiles or [])
            run.run_id = self.next_run_id()
            run.created_at = run.created_at or _now()
            row = {
                **run.__dict__,
                "config": json.dumps(run.config, sort_keys=True, ensure_ascii=False),
                "metrics": json.dumps(run.metrics, sort_keys=True),
            }
            runs = self._open_or_create(RUNS, schemas.RUNS)
            runs.add(pa.Table.from_pylist([row], schema=schemas.RUNS))
            if predictions:
                table = self._open_or_create(PREDICTIONS, schemas.PREDICTIONS)
                rows = [{"run_id": run.run_id, **p.__dict__} for p in predictions]
                table.add(pa.Table.from_pylist(rows, schema=schemas.PREDICTIONS))
        return run

    def list_runs(self, task: str | None = None) -> list[Run]:
        """All runs, oldest first, optionally of one task."""
        table = self._open(RUNS)
        if table is None:
            return []
        rows = scan(table, f"task = {_q(task)}" if task else None).to_pylist()
        runs = [_run_from_row(r) for r in rows]
        return sorted(runs, key=lambda r: id_sort_key(r.run_id))

    def get_run(self, run_id: str) -> Run:
        table = self._open(RUNS)
        rows = [] if table is None else scan(table, f"run_id = {_q(run_id)}").to_pylist()
        if not rows:
            raise StoreError(f"no run '{run_id}' in store {self.uri} (see `persona runs list`)")
        return _run_from_row(rows[0])

    def run_predictions(self, run_id: str) -> list[Prediction]:
        """The run's predictions in query-id order."""
        self.get_run(run_id)
        table = self._open(PREDICTIONS)
        if table is None:
            return []
        rows = scan(table, f"run_id = {_q(run_id)}").to_pylist()
        predictions = [Prediction(**{k: v for k, v in r.items() if k != "run_id"}) for r in rows]
        return sorted(predictions, key=lambda p: id_sort_key(p.query_id))


def _run_from_row(row: dict[str, Any]) -> Run:
    return Run(
        **{
            **row,
            "config": json.loads(row["config"] or "{}"),
            "metrics": json.loads(row["metrics"] or "{}"),
        }
    )
