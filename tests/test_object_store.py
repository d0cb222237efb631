"""The store on object storage: every command against an s3:// store served by a local
S3-compatible server (moto, bound to 127.0.0.1), one-line errors for a missing bucket or an
unreachable endpoint that never show a credential, and a command killed midway that leaves the
store readable at its last complete version."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, cli_fails, cli_json
from recipes.kit.splits import user_split

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

KEY, SECRET = "persona-test-key", "persona-test-secret-do-not-print"


@pytest.fixture(scope="module")
def s3():
    """A local S3 server and the environment LanceDB reads its credentials and endpoint from."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1")
        yield client, endpoint, env
    server.stop()


def _bucket(client, name: str) -> str:
    client.create_bucket(Bucket=name)
    return f"s3://{name}/store"


def _users(tmp: Path, first: int, count: int) -> Path:
    path = tmp / f"users-{first}.jsonl"
    path.write_text("\n".join(EXAMPLES.read_text(encoding="utf-8").splitlines()[first : first + count]) + "\n", encoding="utf-8")
    return path


def test_every_command_runs_against_an_s3_store(s3, tmp_path, tiny_llm_dir):
    client, _, _ = s3
    store = _bucket(client, "every-command")
    llm = ["--llm", str(tiny_llm_dir), "--max-length", "64"]
    ingested = cli_json(store, "ingest", str(_users(tmp_path, 0, 16)), "--task", "LaMP-7")
    assert ingested["store"] == store and ingested["users"] == 16
    assert client.list_objects_v2(Bucket="every-command", Prefix="store/behaviors.lance/")["KeyCount"] > 0  # really in the bucket
    ids = [json.loads(line)["user_id"] for line in EXAMPLES.read_text(encoding="utf-8").splitlines()[:16]]
    user = ids[0]
    hits = cli_json(store, "search", "--user", user, "colour", "--k", "2")
    assert len(hits) == 2
    adapted = cli_json(store, "adapt", "--task", "LaMP-7", "--steps", "2", "--batch-size", "4", "--eval-every", "2", *llm)
    assert adapted["name"] == "task-lora-LaMP-7"
    sharers = [a for u in [u for u in ids if user_split(u) == "train"][:2] for a in ("--sharer", u)]
    cli_json(store, "register-sharers", "--task", "LaMP-7", *sharers, "--steps", "2", "--gate-steps", "2", *llm)
    targets = [u for u in ids if user_split(u) == "test"][:2]
    assembled = cli_json(store, "assemble", "--task", "LaMP-7", *[a for u in targets for a in ("--user", u)], "--top-k", "1", *llm)
    assert sorted(assembled["users"]) == sorted(targets)
    answer = cli_json(store, "generate", "--user", targets[0], "--method", "perpcs", "--llm", str(tiny_llm_dir), "Paraphrase: hello")
    assert answer["method"] == "perpcs"
    run = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "task-lora", "--split", "all", "--limit", "4", "--llm", str(tiny_llm_dir))
    assert run["n_examples"] == 4 and cli_json(store, "runs", "list")["runs"][0]["run_id"] == run["run_id"]
    info = cli_json(store, "store", "info")
    assert info["uri"] == store and {t["table"] for t in info["tables"]} >= {"users", "behaviors", "plugins", "pieces", "runs"}


def test_storage_options_on_the_command_line_are_used_and_never_printed(s3, tmp_path, monkeypatch):
    client, endpoint, env = s3
    store = _bucket(client, "options")
    for name in env:
        monkeypatch.delenv(name)
    options = [f"endpoint={endpoint}", "allow_http=true", "region=us-east-1", f"aws_access_key_id={KEY}", f"aws_secret_access_key={SECRET}"]
    flags = [a for o in options for a in ("--storage-option", o)]
    from typer.testing import CliRunner

    from persona_cli.main import app

    result = CliRunner().invoke(app, ["--store", store, *flags, "ingest", str(_users(tmp_path, 0, 2)), "--task", "LaMP-7", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["users"] == 2 and SECRET not in result.output
    bad = CliRunner().invoke(app, ["--store", "s3://no-such-bucket/store", *flags, "users", "list"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0 and SECRET not in bad.output
    assert "bucket 'no-such-bucket' does not exist" in bad.output
    unnamed = CliRunner().invoke(app, ["--store", store, "--storage-option", f"{SECRET}", "users", "list"])
    assert unnamed.exit_code == 2 and "expected NAME=VALUE" in unnamed.output and SECRET not in unnamed.output


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_line(s3, monkeypatch):
    assert "bucket 'missing' does not exist at http://127.0.0.1" in cli_fails("s3://missing/store", "users", "list")
    monkeypatch.setenv("AWS_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    message = cli_fails("s3://every-command/store", "users", "list")
    assert "cannot reach the object store at http://127.0.0.1:9" in message and SECRET not in message


def _versions(client, bucket: str) -> int:
    listed = client.list_objects_v2(Bucket=bucket, Prefix="store/")
    return sum(1 for item in listed.get("Contents", []) if "/_versions/" in item["Key"])


def test_a_command_killed_midway_leaves_the_store_at_its_last_version(s3, tmp_path):
    client, _, env = s3
    store = _bucket(client, "killed")
    cli_json(store, "ingest", str(_users(tmp_path, 0, 4)), "--task", "LaMP-7")
    before = _versions(client, "killed")
    command = [sys.executable, "-c", "from persona_cli.main import app; app()", "--store", store, "ingest", str(_users(tmp_path, 4, 12)), "--task", "LaMP-7"]
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _versions(client, "killed") == before and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # right after its first table write, before its commit record
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the command finished before it could be killed"
    assert _versions(client, "killed") > before  # it did write
    users = cli_json(store, "users", "list")
    assert users["total"] == 4  # readers see the last complete command
    again = cli_json(store, "ingest", str(_users(tmp_path, 4, 12)), "--task", "LaMP-7")
    assert again["users"] == 12 and cli_json(store, "users", "list")["total"] == 16


def test_errors_are_told_apart_by_the_status_not_by_digits_elsewhere_in_the_message():
    from store.db import object_store_problem

    refused = ValueError('IO { store: "S3", RetryError(RetryErrorImpl { retries: 3, elapsed: 404.7ms, '
                         'inner: Http(ConnectError("tcp connect error", 127.0.0.1:9, "Connection refused")) }) }')
    missing = ValueError('IO { store: "S3", RetryError(RetryErrorImpl { elapsed: 4.5ms, inner: Status { status: 404, '
                         'body: Some("<Code>NoSuchBucket</Code>") } }) }')
    denied = ValueError('IO { store: "S3", RetryError(RetryErrorImpl { inner: Status { status: 403, body: Some("<Code>AccessDenied</Code>") } }) }')
    options = {"endpoint": "http://127.0.0.1:9", "aws_secret_access_key": SECRET}
    assert "cannot reach the object store at http://127.0.0.1:9" in object_store_problem("s3://b/s", refused, options)
    assert "bucket 'b' does not exist" in object_store_problem("s3://b/s", missing, options)
    assert "access denied" in object_store_problem("s3://b/s", denied, options)
    assert all(SECRET not in object_store_problem("s3://b/s", e, options) for e in (refused, missing, denied))
