"""The method registry: every method declares itself once, in its own room, and everything else
(evaluation, generation, the CLI, benchmarks) asks the registry instead of naming methods.

A method is one of two kinds. A *prompt* method decides what the LLM reads for a query (k=0: the
input alone; rag: retrieved history items; pag: a profile). A *model* method decides how the LLM
is changed for each user (a task LoRA, a user's own LoRA, an assembled adapter, soft tokens, a
steering vector) and answers the k=0 prompt, or, for a personal method, any prompt method's
prompt after a '+': 'perpcs+rag'.

Adding a method: a module under recipes/methods/ that calls `register(Method(...))`, and its
module name in METHOD_MODULES below. The CLI's --method and --ablation help are this registry's
`method_help()` and `ablation_help()` written out (persona_cli/options.py, so that help imports no
method); tests/test_cli.py says what to paste there when they differ.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from recipes import PersonaError
from recipes.kit.prompts import PromptContext, PromptSettings
from recipes.kit.serving_plan import ServingPlan
from recipes.kit.tasks import Task
from store import Query, Store

METHOD_MODULES = (
    "k0", "rag", "pag", "task_lora", "oppu", "peft_retrieval", "perpcs.serving", "pplug.serving", "style_vector",
)  # fmt: skip
"""Every method's room (under recipes.methods), in the order the CLI lists them."""

SHARED_OPTIONS = ("plugin", "pool", "top_k")
"""The options of the generate / evaluate commands that a model method may take (--plugin, --pool, --top-k)."""


@dataclass(frozen=True)
class Setting:
    """A method-specific option, given as `--set NAME=VALUE`."""

    default: Any
    parse: Callable[[str], Any]
    help: str


@dataclass(frozen=True)
class MethodOptions:
    """What a request says about its method besides its name."""

    plugin: Optional[str] = None
    pool: Optional[str] = None
    top_k: Optional[int] = None
    ablation: bool = False
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    served: tuple[str, ...] = ()
    """Every user the command serves when it is answered in parts (a Ray shard sees only its own):
    an ablation draws its donors among them, so every engine serves the same donors."""

    def setting(self, name: str) -> Any:
        return self.settings[name]


PromptBuilder = Callable[[PromptContext, list[Query]], tuple[list[str], dict]]
Planner = Callable[[Store, Task, list[str], MethodOptions], ServingPlan]


@dataclass(frozen=True)
class Method:
    """One method's declaration: its name, what it takes and needs, and how it serves a batch.

    `prompts` (prompt methods) builds one prompt per query; `plan` (model methods) says, before
    any model loads, what the LLM needs for prompts of these users (one user id per prompt).
    `ablation` describes the non-personal counterpart `plan` serves when asked for it;
    `donor_ablation` says that counterpart reads another user's history (a donor's)."""

    name: str
    summary: str
    needs: str = "the users' histories"
    trained_by: Optional[str] = None
    prompts: Optional[PromptBuilder] = None
    plan: Optional[Planner] = None
    options: tuple[str, ...] = ()
    settings: dict[str, Setting] = field(default_factory=dict)
    ablation: Optional[str] = None
    donor_ablation: bool = False
    personal: bool = False
    label: Optional[Callable[[MethodOptions, PromptSettings], str]] = None

    @property
    def kind(self) -> str:
        return "prompt" if self.prompts is not None else "model"

    def tag(self, options: MethodOptions, prompt: PromptSettings) -> str:
        """The method's short name in run tables, e.g. rag-bm25-k4."""
        return self.label(options, prompt) if self.label is not None else self.name

    def describe(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "summary": self.summary, "needs": self.needs, "trained_by": self.trained_by,
            "options": list(self.options), "settings": {k: {"default": s.default, "help": s.help} for k, s in self.settings.items()},
            "ablation": self.ablation, "combines_with_prompt_methods": self.personal,
        }  # fmt: skip


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Declare a method (once per name; a method module calls this at import)."""
    if (method.prompts is None) == (method.plan is None):
        raise ValueError(f"method {method.name}: give exactly one of prompts (a prompt method) or plan (a model method)")
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"method {method.name} is registered twice")
    unknown = set(method.options) - set(SHARED_OPTIONS)
    if unknown:
        raise ValueError(f"method {method.name}: unknown shared options {sorted(unknown)}")
    _METHODS[method.name] = method
    return method


def methods() -> list[Method]:
    """Every registered method, prompt methods first, each kind in the order of METHOD_MODULES."""
    for module in METHOD_MODULES:
        importlib.import_module(f"recipes.methods.{module}")
    return sorted(_METHODS.values(), key=lambda m: (m.kind != "prompt", _room(m)))


def _room(method: Method) -> int:
    """Where the method's module stands in METHOD_MODULES (whichever module was imported first)."""
    module = (method.prompts or method.plan).__module__.removeprefix("recipes.methods.")
    return METHOD_MODULES.index(module) if module in METHOD_MODULES else len(METHOD_MODULES)


def default_prompt() -> Method:
    """The prompt method a model method answers when no '+PROMPT' follows it: the first registered (k=0)."""
    return next(m for m in methods() if m.kind == "prompt")


def get_method(name: str) -> Method:
    found = {m.name: m for m in methods()}
    if name not in found:
        raise PersonaError(f"--method {name}: expected one of {', '.join(found)}")
    return found[name]


def parse_method(method: str) -> tuple[Optional[Method], Method]:
    """(model method or None, prompt method): 'perpcs+rag' -> (perpcs, rag), 'oppu' -> (oppu, k=0), 'rag' -> (None, rag)."""
    first, plus, second = method.partition("+")
    known = methods()
    names = {m.name: m for m in known}
    chosen = names.get(first)
    if chosen is not None and not plus:
        return (None, chosen) if chosen.kind == "prompt" else (chosen, default_prompt())
    prompt = names.get(second)
    if chosen is not None and chosen.personal and prompt is not None and prompt.kind == "prompt":
        return chosen, prompt
    personal = ", ".join(f"{m.name}+PROMPT" for m in known if m.personal)
    raise PersonaError(f"--method {method}: expected one of {', '.join(names)}, or {personal} with a prompt method")


def method_help() -> str:
    """The --method help text, made from the registry."""
    known = methods()
    prompt = ", ".join(m.name for m in known if m.kind == "prompt")
    model = ", ".join(m.name for m in known if m.kind == "model")
    example = next((m.name for m in known if m.personal), "")
    return f"Prompt methods: {prompt}. Model methods: {model}. A personal model method with a prompt method: e.g. {example}+rag. See `persona methods`."


def ablation_help() -> str:
    return "Serve a personal method's non-personal ablation: " + "; ".join(f"{m.name}: {m.ablation}" for m in methods() if m.ablation) + "."


def method_settings(method: Method, given: dict[str, str]) -> dict[str, Any]:
    """The method's settings: its defaults with `--set NAME=VALUE` values parsed over them."""
    unknown = sorted(set(given) - set(method.settings))
    if unknown:
        takes = ", ".join(method.settings) or "none"
        raise PersonaError(f"--set {unknown[0]}: method {method.name} takes no such setting (its settings: {takes})")
    values = {name: s.default for name, s in method.settings.items()}
    for name, text in given.items():
        try:
            values[name] = method.settings[name].parse(text)
        except (TypeError, ValueError) as exc:
            raise PersonaError(f"--set {name}={text}: {exc}") from None
    return values
