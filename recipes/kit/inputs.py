"""Readers and validators for users.jsonl and LaMP JSON, streamed so large files use bounded memory.

Both readers yield `UserInput`s. Every problem raises `InputError` naming the file, the line
(users.jsonl) or item index (LaMP JSON), and the field, so a user can fix it at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import ijson

from recipes import PersonaError
from recipes.kit.tasks import Task, canonical_task_name
from store import Query


class InputError(PersonaError):
    """Bad input: one line naming where (file, line or item) and which field."""

    def __init__(self, path: str | Path, where: str, field_name: str | None, message: str) -> None:
        location = f"{path}: {where}"
        if field_name:
            location += f": field '{field_name}'"
        super().__init__(f"{location}: {message}")


@dataclass
class ItemInput:
    """One validated history item before embedding."""

    item_id: str
    text: str
    fields: dict[str, Any]
    timestamp: datetime | None


@dataclass
class UserInput:
    """One validated user: history items, queries and any extra user-level fields."""

    user_id: str
    task: str
    items: list[ItemInput] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------- field checks shared by both formats ----------


def _id(value: Any, err) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise err(f"must be a string or integer id, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise err("is empty")
    return text


def _text(value: Any, err) -> str:
    if not isinstance(value, str):
        raise err(f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise err("is empty")
    return value


def _timestamp(value: Any, err) -> datetime | None:
    """ISO 8601 strings or epoch seconds; stored as naive UTC."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise err("must be an ISO 8601 string or epoch seconds")
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc).replace(tzinfo=None)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise err(f"'{value}' is not an ISO 8601 date or time") from None
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
        return parsed
    raise err(f"must be an ISO 8601 string or epoch seconds, got {type(value).__name__}")


def _list(value: Any, err) -> list:
    if not isinstance(value, list):
        raise err(f"must be a list, got {type(value).__name__}")
    return value


def _obj(value: Any, err) -> dict:
    if not isinstance(value, dict):
        raise err(f"must be an object, got {type(value).__name__}")
    return value


class _Errors:
    """Builds InputErrors for one place in one file."""

    def __init__(self, path: Path, where: str) -> None:
        self.path, self.where = path, where

    def at(self, field_name: str | None):
        return lambda message: InputError(self.path, self.where, field_name, message)


# ---------- users.jsonl ----------

_USER_KEYS = {"user_id", "history", "queries"}


def read_users_jsonl(path: str | Path, task: Task, split: str | None = None) -> Iterator[UserInput]:
    """Yield validated users from a users.jsonl file, one JSON object per line (blank lines skipped).

    Checks within the file: ids unique (users, items per user, queries), texts non-empty,
    types right. Raises InputError at the first problem.
    """
    path = Path(path)
    seen_users: dict[str, int] = {}
    seen_queries: dict[str, int] = {}
    with _open_binary(path) as handle:
        for number, line in _numbered_lines(handle, path):
            if not line.strip():
                continue
            errors = _Errors(path, f"line {number}")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise errors.at(None)(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            _obj(record, errors.at(None))
            if "user_id" not in record:
                raise errors.at("user_id")("is missing")
            user_id = _id(record["user_id"], errors.at("user_id"))
            if user_id in seen_users:
                raise errors.at("user_id")(f"duplicate user '{user_id}' (first on line {seen_users[user_id]})")
            seen_users[user_id] = number
            if "history" not in record:
                raise errors.at("history")("is missing")
            user = UserInput(user_id=user_id, task=task.name, metadata={k: v for k, v in record.items() if k not in _USER_KEYS})
            user.items = _history_items(_list(record["history"], errors.at("history")), errors, task, "history")
            for index, raw in enumerate(_list(record.get("queries", []), errors.at("queries"))):
                query = _jsonl_query(raw, index, errors, user_id, task, split)
                if query.query_id in seen_queries:
                    raise errors.at(f"queries[{index}].id")(
                        f"duplicate query id '{query.query_id}' (first on line {seen_queries[query.query_id]})"
                    )
                seen_queries[query.query_id] = number
                user.queries.append(query)
            yield user


def _jsonl_query(raw: Any, index: int, errors: _Errors, user_id: str, task: Task, split: str | None) -> Query:
    where = f"queries[{index}]"
    raw = _obj(raw, errors.at(where))
    for required in ("id", "input"):
        if required not in raw:
            raise errors.at(f"{where}.{required}")("is missing")
    output = raw.get("output")
    if output is not None:
        output = _text(output, errors.at(f"{where}.output"))
    query_split = raw.get("split", split)
    if query_split is not None:
        query_split = _text(query_split, errors.at(f"{where}.split"))
    return Query(
        query_id=_id(raw["id"], errors.at(f"{where}.id")),
        user_id=user_id,
        task=task.name,
        input=_text(raw["input"], errors.at(f"{where}.input")),
        output=output,
        split=query_split,
    )


def _history_items(raw_items: list, errors: _Errors, task: Task, where: str) -> list[ItemInput]:
    """Validate one user's history; ids default to the item's position."""
    items: list[ItemInput] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_items):
        at = f"{where}[{index}]"
        raw = _obj(raw, errors.at(at))
        item_id = _id(raw["id"], errors.at(f"{at}.id")) if "id" in raw else f"#{index}"
        if item_id in seen:
            raise errors.at(f"{at}.id")(f"duplicate item id '{item_id}' in this user's history")
        seen.add(item_id)
        for name in task.doc_fields:
            if name not in raw:
                raise errors.at(f"{at}.{name}")(f"is missing (task {task.name} embeds {' + '.join(task.doc_fields)})")
            _text(raw[name], errors.at(f"{at}.{name}"))
        time_key = "timestamp" if "timestamp" in raw else "date"
        timestamp = _timestamp(raw.get(time_key), errors.at(f"{at}.{time_key}"))
        fields = {k: v for k, v in raw.items() if k not in ("id", "timestamp")}
        items.append(ItemInput(item_id=item_id, text=task.document(raw), fields=fields, timestamp=timestamp))
    return items


def read_user_ids(path: str | Path) -> list[str]:
    """User ids from a text file, one per line (blank lines and # comments skipped)."""
    path = Path(path)
    ids: list[str] = []
    seen: set[str] = set()
    with _open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                user_id = line.split("#", 1)[0].strip()
                if not user_id:
                    continue
                if user_id in seen:
                    raise InputError(path, f"line {number}", "user_id", f"duplicate user id '{user_id}'")
                seen.add(user_id)
                ids.append(user_id)
        except UnicodeDecodeError:
            raise InputError(path, "file", None, "is not UTF-8 text") from None
    if not ids:
        raise InputError(path, "file", None, "lists no user ids (one per line)")
    return ids


# ---------- LaMP JSON ----------


def read_lamp_outputs(path: str | Path, task: Task, allow_empty: bool = False) -> dict[str, str]:
    """Gold outputs by question id from a LaMP outputs.json ({task, golds: [{id, output}]}).

    Prediction files have the same format; a system's answer may be empty (allow_empty)."""
    path = Path(path)
    errors = _Errors(path, "top level")
    try:
        with _open_text(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"line {exc.lineno}", None, f"not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise InputError(path, "file", None, "is not UTF-8 text") from None
    _obj(data, errors.at(None))
    if "golds" not in data:
        raise errors.at("golds")("is missing")
    if "task" in data:
        named = canonical_task_name(_text(data["task"], errors.at("task")))
        if _task_number(named) != _task_number(task.name):
            raise errors.at("task")(f"says '{data['task']}' but --task is {task.name}")
    golds: dict[str, str] = {}
    for index, raw in enumerate(_list(data["golds"], errors.at("golds"))):
        item_errors = _Errors(path, f"golds item {index}")
        raw = _obj(raw, item_errors.at(None))
        for required in ("id", "output"):
            if required not in raw:
                raise item_errors.at(required)("is missing")
        gold_id = _id(raw["id"], item_errors.at("id"))
        if gold_id in golds:
            raise item_errors.at("id")(f"duplicate id '{gold_id}'")
        output = raw["output"]
        if allow_empty and isinstance(output, str):
            golds[gold_id] = output
        else:
            golds[gold_id] = _text(output, item_errors.at("output"))
    return golds


def read_lamp_questions(
    path: str | Path, task: Task, golds: dict[str, str] | None = None, split: str | None = None
) -> Iterator[UserInput]:
    """Yield one UserInput per LaMP question (its profile is the history; user id = question id
    unless the question names a user_id). Streams the JSON array item by item."""
    path = Path(path)
    seen: set[str] = set()
    index = -1
    with _open_binary(path) as handle:
        try:
            for index, raw in enumerate(ijson.items(handle, "item", use_float=True)):
                errors = _Errors(path, f"item {index}")
                yield _lamp_question(raw, errors, task, golds, split, seen)
        except ijson.JSONError as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else "parse error"
            raise InputError(path, f"item {index + 1}", None, f"not valid JSON ({first_line})") from None
    if index < 0:
        raise InputError(path, "top level", None, "holds no questions (expected a JSON array of objects)")
    if golds is not None:
        unknown = sorted(set(golds) - seen)
        if unknown:
            raise InputError(path, "outputs", "id", f"{len(unknown)} gold outputs name no question here, e.g. '{unknown[0]}'")


def _lamp_question(
    raw: Any, errors: _Errors, task: Task, golds: dict[str, str] | None, split: str | None, seen: set[str]
) -> UserInput:
    raw = _obj(raw, errors.at(None))
    for required in ("id", "input", "profile"):
        if required not in raw:
            raise errors.at(required)("is missing")
    question_id = _id(raw["id"], errors.at("id"))
    if question_id in seen:
        raise errors.at("id")(f"duplicate question id '{question_id}'")
    seen.add(question_id)
    user_id = _id(raw["user_id"], errors.at("user_id")) if "user_id" in raw else question_id
    items = _history_items(_list(raw["profile"], errors.at("profile")), errors, task, "profile")
    query = Query(
        query_id=question_id,
        user_id=user_id,
        task=task.name,
        input=_text(raw["input"], errors.at("input")),
        output=golds.get(question_id) if golds is not None else None,
        split=split,
    )
    return UserInput(user_id=user_id, task=task.name, items=items, queries=[query])


def _task_number(name: str) -> str:
    digits = "".join(ch for ch in name if ch.isdigit())
    return digits or name


def _numbered_lines(handle, path: Path) -> Iterator[tuple[int, str]]:
    """Lines of a binary handle decoded one at a time, so a bad byte is reported on its own line."""
    for number, raw in enumerate(handle, start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(path, f"line {number}", None, "is not UTF-8 text") from None


def _open_binary(path: Path):
    if not path.is_file():
        raise InputError(path, "file", None, "does not exist")
    return open(path, "rb")


def _open_text(path: Path):
    _open_binary(path).close()
    return open(path, encoding="utf-8")
