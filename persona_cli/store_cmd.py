"""`persona store info|optimize`."""

from __future__ import annotations

import typer
from rich.table import Table

from persona_cli.common import console, handle_errors, human_bytes, open_store, print_json
from persona_cli.options import JsonOption

app = typer.Typer(help="Look after the store: sizes, versions, compaction.", no_args_is_help=True)


@app.command("info")
@handle_errors
def info(ctx: typer.Context, json_out: bool = JsonOption) -> None:
    """Tables, rows, versions and size on disk."""
    facts = open_store(ctx).info()
    if json_out:
        print_json(facts)
        return
    console.print(f"store [bold]{facts['uri']}[/]  format v{facts['format_version']}  encoder {facts['encoder'] or '-'}"
                  f"  on disk {human_bytes(facts['disk_bytes'])}")
    table = Table("table", "rows", "version", "versions kept", "data bytes")
    for t in facts["tables"]:
        table.add_row(t["table"], str(t["rows"]), str(t["version"]), str(t["versions"]), human_bytes(t["bytes"]))
    console.print(table)


@app.command("optimize")
@handle_errors
def optimize(
    ctx: typer.Context,
    prune_versions: bool = typer.Option(False, "--prune-versions", help="Also delete old untagged table versions (do not run while another process uses the store)."),
    json_out: bool = JsonOption,
) -> None:
    """Compact small fragments (many ingests leave many) and merge the indexes each write added to."""
    result = open_store(ctx).optimize(prune_versions=prune_versions)
    if json_out:
        print_json(result)
        return
    console.print(f"optimized: {human_bytes(result['disk_bytes_before'])} -> {human_bytes(result['disk_bytes_after'])} on disk")
    if result["versions_kept"]:
        console.print(f"kept the versions of {', '.join(result['versions_kept'])}: tagged pool versions stay readable")
