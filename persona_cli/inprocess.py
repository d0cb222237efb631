"""Running `persona` commands inside a Python process (the demo, the benchmarks): the CLI and its
libraries load once instead of once per command, and each command's own code runs as typed."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path


def run_persona(store: str | Path, *args: str, quiet: bool = False, echo: bool = True) -> dict:
    """Run `persona --store STORE ARGS` here (printing the command line when `echo`). With `quiet`
    it runs with --json and returns the parsed output instead of showing it; a failed command
    returns {"exit_code": N} (its one-line error printed as usual)."""
    from persona_cli.main import app

    if echo:
        print(f"$ persona {shlex.join(args)}", flush=True)
    argv = ["--store", str(store), *args] + (["--json"] if quiet else [])
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured) if quiet else contextlib.nullcontext():
        try:
            code = app(argv, prog_name="persona", standalone_mode=False)
        except SystemExit as stop:
            code = stop.code
    if code not in (0, None):
        return {"exit_code": code}
    return json.loads(captured.getvalue()) if quiet else {}
