"""`persona methods`: every method the registry knows, what it takes and needs, and its ablation."""

from __future__ import annotations

from rich.table import Table

from persona_cli.common import console, print_json
from persona_cli.options import JsonOption


def methods(json_out: bool = JsonOption) -> None:
    """List the methods: prompt methods (what the LLM reads) and model methods (how it is changed per user)."""
    from recipes.methods.registry import methods as registered

    found = [m.describe() for m in registered()]
    if json_out:
        print_json(found)
        return
    table = Table("method", "kind", "what it does", "needs", "made by", "options", "ablation", title="methods")
    for m in found:
        options = [f"--{o.replace('_', '-')}" for o in m["options"]] + [f"--set {k}={v['default']}" for k, v in m["settings"].items()]
        name = m["name"] + ("[+PROMPT]" if m["combines_with_prompt_methods"] else "")
        table.add_row(name, m["kind"], m["summary"], m["needs"], m["trained_by"] or "-", " ".join(options) or "-", m["ablation"] or "-")
    console.print(table)
    console.print(
        "Any method: --reuse-history MIN answers an input that nearly repeats one of the user's history items with that "
        "item's own answer (ablation: the donor's history).", highlight=False, markup=False,
    )
    console.print(
        "Any generation method: --user-spellings MIN spells common words of the answer the way the user's history does "
        "(u for you) where it uses that spelling at least MIN times (ablation: the donor's history).", highlight=False, markup=False,
    )
