"""Evaluation runs: pick queries, build prompts, answer, score with LaMP's metrics, store the run.

Also scores LaMP-format prediction files from any system and compares stored runs on exactly
the query ids they share.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from recipes import PersonaError
from recipes.kit.backbones import LLM, Encoder
from recipes.kit.decoding import Decoding
from recipes.kit.engine import LOCAL, Engine, fan_out
from recipes.kit.inputs import read_lamp_outputs
from recipes.flows.answer import answer_prompts, method_prompts, respell, reuse, stage_histories
from recipes.kit.progress import Progress
from recipes.kit.serving_plan import ServingPlan
from recipes.flows.serve import MethodRequest, method_label as request_label, plan_serving
from recipes.kit.splits import SPLITS, query_split
from recipes.methods.history_reuse import check_min_overlap
from recipes.methods.user_spellings import check_spellings
from recipes.kit.tasks import GENERATION, Task, get_task
from store import Prediction, Profile, Query, Run, Store, id_sort_key

ANSWER_MODES = ("auto", "rank", "generate")
SCORINGS = ("cleaned", "exact")
"""How answers are scored: 'cleaned' (first paragraph, no leading announcement or wrapping quotes,
free text mapped onto the task's labels; generation runs also carry the exact scores as
METRIC-exact) or 'exact' (the answer as generated, whitespace trimmed: LaMP's own scoring)."""


@dataclass
class EvalRequest:
    """Everything that defines a run; stored with it as its config."""

    task: str
    method: str = "none"
    k: int = 1
    retriever: str = "bm25"
    min_similarity: Optional[float] = None
    answer: str = "auto"
    split: str = "test"
    limit: Optional[int] = None
    users: Optional[list[str]] = field(default=None, repr=False)
    batch_size: int = 16
    max_new_tokens: Optional[int] = None
    max_input_tokens: int = 1024
    seed: int = 0
    plugin: Optional[str] = None
    base: Optional[str] = None
    pool: Optional[str] = None
    top_k: Optional[int] = None
    num_beams: Optional[int] = None
    no_repeat_ngram_size: Optional[int] = None
    repetition_penalty: Optional[float] = None
    length_ratio: Optional[float] = None
    length_penalty: Optional[float] = None
    ablation: bool = False
    scoring: str = "cleaned"
    settings: dict[str, str] = field(default_factory=dict)
    reuse_min_overlap: Optional[float] = None
    spelling_min_count: Optional[int] = None

    def decoding(self, task: Task) -> Decoding:
        """The task's decoding with this request's overrides."""
        return task.decoding.override(
            num_beams=self.num_beams, no_repeat_ngram_size=self.no_repeat_ngram_size,
            repetition_penalty=self.repetition_penalty, length_ratio=self.length_ratio, length_penalty=self.length_penalty,
        )  # fmt: skip

    def method_request(self) -> MethodRequest:
        return MethodRequest(
            method=self.method, k=self.k, retriever=self.retriever, min_similarity=self.min_similarity, seed=self.seed,
            plugin=self.plugin, base=self.base,
            pool=self.pool, top_k=self.top_k, ablation=self.ablation, settings=dict(self.settings),
        )  # fmt: skip


def answer_mode(task: Task, answer: str) -> str:
    """'rank' or 'generate': auto ranks the labels of classification tasks and generates otherwise."""
    if answer not in ANSWER_MODES:
        raise PersonaError(f"--answer {answer}: expected one of {', '.join(ANSWER_MODES)}")
    if answer == "auto":
        return "rank" if task.is_classification else "generate"
    if answer == "rank" and not task.is_classification:
        raise PersonaError(f"--answer rank needs a task with a label set; {task.name} is a generation task")
    return answer


def select_queries(
    store: Store, task: Task, split: str = "test", limit: Optional[int] = None, users: Optional[list[str]] = None
) -> list[Query]:
    """Queries of `task` that have a gold output, of one split ('all' for every split), optionally
    only of some users, at most `limit` of them (in user and query id order)."""
    if split != "all" and split not in SPLITS:
        raise PersonaError(f"--split {split}: expected one of {', '.join(SPLITS)} or all")
    if limit is not None and limit < 1:
        raise PersonaError(f"--limit must be at least 1, got {limit}")
    queries = [q for q in store.task_queries(task.name) if q.output is not None]
    if not queries:
        raise PersonaError(f"store {store.uri} has no {task.name} queries with gold outputs (ingest them with --outputs)")
    if users is not None:
        known = {q.user_id for q in queries}
        unknown = [u for u in users if u not in known]
        if unknown:
            raise PersonaError(f"user '{unknown[0]}' has no {task.name} queries with gold outputs in this store")
        wanted = set(users)
        queries = [q for q in queries if q.user_id in wanted]
    if split != "all":
        queries = [q for q in queries if query_split(q.split, q.user_id) == split]
    if not queries:
        raise PersonaError(f"no {task.name} queries in split '{split}'" + (" for these users" if users else ""))
    return queries[:limit] if limit else queries


def evaluate(
    store: Store,
    request: EvalRequest,
    load_llm: Callable[[], LLM],
    load_encoder: Optional[Callable[[], Encoder]] = None,
    progress: Optional[Progress] = None,
    engine: Engine = LOCAL,
) -> tuple[Run, list[Prediction]]:
    """Run one prompt method on the selected queries, score it, and store the run and its predictions.

    The request is checked against the store before any model is loaded. Wall time and
    examples/s cover everything after loading: history reads, profiles, prompts, answers, scoring.
    A Ray `engine` answers shards of whole users on its workers (each loads the models once and
    opens the store by URI; wall time then includes their loading); scoring and the one write of
    the run happen here.
    """
    task = get_task(request.task)
    method = request.method_request()
    method.prompt_settings()
    mode = answer_mode(task, request.answer)
    decoding = request.decoding(task)
    decoding.validate()
    check_min_overlap(request.reuse_min_overlap)
    check_spellings(task, request.spelling_min_count)
    if request.batch_size < 1:
        raise PersonaError(f"--batch-size must be at least 1, got {request.batch_size}")
    if request.scoring not in SCORINGS:
        raise PersonaError(f"--scoring {request.scoring}: expected one of {', '.join(SCORINGS)}")
    queries = select_queries(store, task, request.split, request.limit, request.users)
    task.check_golds([(q.query_id, q.output) for q in queries])
    plan = plan_serving(store, task, method, [q.user_id for q in queries])
    served = tuple(sorted({q.user_id for q in queries})) if method.ablation else ()  # a shard's donors: any user served
    answerer = _Answerer(request, task, mode, decoding, served)
    if engine.is_local:
        llm = load_llm()
        started = time.perf_counter()
        shards = [answerer(store, llm, queries, load_encoder, progress, plan)]
    else:
        started = time.perf_counter()
        where = (store.uri, store.storage_options)
        work = user_shards(queries, engine.workers * SHARDS_PER_WORKER, request.batch_size)
        make = lambda: answerer.on_worker(where, load_llm, load_encoder)  # noqa: E731
        shards = list(fan_out(engine, make, work, len(work), progress, "answering shards of users"))
    raw = [answer for shard in shards for answer in shard.raw]
    profiles = [profile for shard in shards for profile in shard.profiles]  # stored with the run only
    config = {k: v for k, v in asdict(request).items() if k != "users"}
    if mode == "generate":
        config.update(asdict(decoding), max_new_tokens=request.max_new_tokens or task.max_new_tokens)
    config.update(task=task.name, answer=mode, llm=shards[0].llm, users=len({q.user_id for q in queries}), **plan.facts())
    config.update(merge_facts([shard.facts for shard in shards]), **engine.describe())
    outputs, metrics = score_answers(task, raw, [q.output for q in queries], request.scoring)
    wall = time.perf_counter() - started
    run = Run(
        run_id="", task=task.name, method=method_label(request), split=request.split, llm=shards[0].llm,
        n_examples=len(queries), wall_s=round(wall, 3), examples_per_s=round(len(queries) / wall, 3),
        config=config, metrics=metrics,
    )  # fmt: skip
    predictions = [Prediction(q.query_id, q.user_id, o, r, q.output) for q, o, r in zip(queries, outputs, raw)]
    return store.save_run(run, predictions, profiles), predictions


SHARDS_PER_WORKER = 4
"""A Ray evaluation cuts its queries into about this many shards per worker (whole users each)."""


@dataclass
class Answered:
    """One shard's raw answers (in query order), its prompt facts, its new PAG profiles, its LLM."""

    raw: list[str]
    facts: dict
    profiles: list[Profile]
    llm: str


@dataclass
class _Answerer:
    """Answers a list of queries by a request's method: the serving plan for their users, the
    method's prompts, then the answers. The same code runs in this process or on a Ray worker."""

    request: EvalRequest
    task: Task
    mode: str
    decoding: Decoding
    served: tuple[str, ...] = ()

    def __call__(
        self, store: Store, llm: LLM, queries: list[Query], load_encoder: Optional[Callable[[], Encoder]] = None,
        progress: Optional[Progress] = None, plan: Optional[ServingPlan] = None,
    ) -> Answered:  # fmt: skip
        request, method = self.request, replace(self.request.method_request(), served=self.served)
        plan = plan or plan_serving(store, self.task, method, [q.user_id for q in queries])
        histories = stage_histories(store, self.task, method, [q.user_id for q in queries], request.reuse_min_overlap, request.spelling_min_count)
        reused = reuse(self.task, queries, histories, request.reuse_min_overlap)
        rest = [q for q, answer in zip(queries, reused) if answer is None]
        profiles: list[Profile] = []
        facts: dict = {} if request.reuse_min_overlap is None else {"reused": len(queries) - len(rest)}
        answers: list[str] = []
        respelled = 0
        if rest:
            per_row = plan.prepare(llm, rest)
            prompts, prompt_facts = method_prompts(
                store, llm, self.task, method, rest, load_encoder, request.batch_size, request.max_input_tokens, progress, profiles
            )
            facts.update(prompt_facts)
            answers = answer_prompts(
                llm, self.task, self.mode, prompts, request.batch_size, request.max_new_tokens, request.max_input_tokens, progress,
                per_row, self.decoding, [q.input for q in rest],
            )  # fmt: skip
            answers, respelled = respell(self.task, rest, answers, histories, request.spelling_min_count)
        if request.spelling_min_count is not None:
            facts["respelled"] = respelled
        generated = iter(answers)
        raw = [answer if answer is not None else next(generated) for answer in reused]
        return Answered(raw, facts, profiles, llm.id)

    def on_worker(
        self, where: tuple[str, dict], load_llm: Callable[[], LLM], load_encoder: Optional[Callable[[], Encoder]]
    ) -> Callable[[list[Query]], Answered]:
        """A Ray worker's answerer: the store opened by URI and the LLM loaded once for all its shards."""
        store, llm = Store(*where), load_llm()
        return lambda queries: self(store, llm, queries, load_encoder)


def user_shards(queries: list[Query], shards: int, least: int = 1) -> list[list[Query]]:
    """`queries` (grouped by user) cut into about `shards` runs of at least `least` queries, only
    between users, so one user's queries (and per-user state) stay on one worker."""
    size = max(least, -(-len(queries) // max(shards, 1)))
    cut: list[list[Query]] = [[]]
    for n, query in enumerate(queries):
        if len(cut[-1]) >= size and query.user_id != queries[n - 1].user_id:
            cut.append([])
        cut[-1].append(query)
    return cut


def merge_facts(shard_facts: list[dict]) -> dict:
    """The prompt facts of all shards: counts add up, anything else is the first shard's."""
    merged: dict = {}
    for facts in shard_facts:
        for key, value in facts.items():
            if key in merged and isinstance(value, int) and not isinstance(value, bool):
                merged[key] += value
            else:
                merged.setdefault(key, value)
    return merged


def score_answers(task: Task, raw: list[str], golds: list[str], scoring: str) -> tuple[list[str], dict[str, float]]:
    """The answers as scored and their metrics (see SCORINGS); cleaned generation also reports
    each of LaMP's metrics on the exact answers, so the effect of cleaning is always on record."""
    exact = [r.strip() for r in raw]
    if scoring == "exact":
        return exact, task.score(exact, golds)
    outputs = [task.normalize(r) for r in raw]
    metrics = task.score(outputs, golds)
    if task.kind == GENERATION:
        exact_metrics = task.score(exact, golds)
        metrics.update({f"{name}-exact": exact_metrics[name] for name in task.metric_names})
    return outputs, metrics


def method_label(request: EvalRequest) -> str:
    """The run's short name for tables (see flows.serve.method_label); with history reused:
    'none+reuse0.4'; respelled: 'none+spell2'; scored exactly: 'none@exact'."""
    reusing = f"+reuse{request.reuse_min_overlap:g}" if request.reuse_min_overlap is not None else ""
    spelling = f"+spell{request.spelling_min_count}" if request.spelling_min_count is not None else ""
    return request_label(request.method_request()) + reusing + spelling + ("@exact" if request.scoring == "exact" else "")


# ---------- LaMP prediction files ----------


def lamp_predictions(task: Task, predictions: list[Prediction]) -> dict:
    """Predictions in LaMP's own format ({task, golds: [{id, output}]}), for LaMP's scorer or ours."""
    return {
        "task": task.lamp_name or task.name,
        "golds": [{"id": p.query_id, "output": p.output} for p in predictions],
    }


def write_lamp_predictions(path: str | Path, task: Task, predictions: list[Prediction]) -> None:
    """Write predictions as a LaMP predictions JSON file."""
    Path(path).write_text(json.dumps(lamp_predictions(task, predictions), ensure_ascii=False, indent=1) + "\n")


def score_files(task_name: str, predictions_path: str | Path, outputs_path: str | Path) -> dict:
    """LaMP metrics of a predictions file against an outputs file; every gold id must be answered.

    Answers are scored as written, as LaMP's own scorer does: normalization is for the raw text
    of our own runs, whose stored (and exported) outputs are already normalized."""
    task = get_task(task_name)
    golds = read_lamp_outputs(outputs_path, task)
    predicted = read_lamp_outputs(predictions_path, task, allow_empty=True)
    missing = [i for i in golds if i not in predicted]
    if missing:
        raise PersonaError(f"{predictions_path}: {len(missing)} of {len(golds)} gold ids have no prediction, e.g. '{missing[0]}'")
    extra = [i for i in predicted if i not in golds]
    if extra:
        raise PersonaError(f"{predictions_path}: {len(extra)} predictions name no gold id in {outputs_path}, e.g. '{extra[0]}'")
    ids = list(golds)
    outputs = [predicted[i] for i in ids]
    return {"task": task.name, "n_examples": len(ids), "metrics": task.score(outputs, [golds[i] for i in ids])}


# ---------- comparing stored runs ----------


def compare_runs(store: Store, run_ids: list[str]) -> dict:
    """Metrics of each run recomputed on the query ids all of them answered, side by side."""
    if len(run_ids) < 2:
        raise PersonaError("compare needs at least two run ids")
    runs = [store.get_run(r) for r in run_ids]
    tasks = {r.task for r in runs}
    if len(tasks) > 1:
        raise PersonaError(f"runs are of different tasks ({', '.join(sorted(tasks))}); compare runs of one task")
    task = get_task(runs[0].task)
    answers = {r.run_id: {p.query_id: p for p in store.run_predictions(r.run_id)} for r in runs}
    shared = set.intersection(*(set(a) for a in answers.values()))
    if not shared:
        raise PersonaError(f"runs {', '.join(run_ids)} share no query ids")
    ordered = sorted(shared, key=id_sort_key)
    rows = []
    for run in runs:
        preds = [answers[run.run_id][q] for q in ordered]
        rows.append(
            {
                "run_id": run.run_id,
                "method": run.method,
                "split": run.split,
                "n_examples": run.n_examples,
                "examples_per_s": run.examples_per_s,
                "metrics": task.score([p.output for p in preds], [p.gold for p in preds]),
            }
        )
    names = [*task.metric_names, *task.supplementary_metric_names]
    return {"task": task.name, "shared_queries": len(ordered), "metric_names": names, "runs": rows}
