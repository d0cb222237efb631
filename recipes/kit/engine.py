"""Where per-user work runs: in this process (`local`) or fanned out with Ray Data (`ray`).

A command splits its work into units (a chunk of texts to embed, a sharer to train, a user to
assemble, a shard of queries to answer) and gives the engine a way to make a worker, a callable
that turns one unit into one result. The local engine makes one worker and calls it in turn; the
Ray engine ships the worker's recipe to a pool of Ray Data actors (each makes its worker once:
loads its models, opens the store by URI) and streams the units through them. Results come back
in unit order either way, and the driver alone writes to the store, so a command commits once,
as it does locally. On a cluster every worker must reach the store: put it on object storage.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from recipes import PersonaError
from recipes.kit.progress import Progress, report

ENGINES = ("local", "ray")
Worker = Callable[[Any], Any]


@dataclass(frozen=True)
class Engine:
    """How to run per-user work: `name` local or ray; for Ray the cluster's `address` (None: start
    a local Ray on this machine), how many `workers` (actors) and the CPUs / GPUs each one takes."""

    name: str = "local"
    address: Optional[str] = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def validate(self) -> None:
        if self.name not in ENGINES:
            raise PersonaError(f"--engine {self.name}: expected one of {', '.join(ENGINES)}")
        if self.workers < 1:
            raise PersonaError(f"--workers must be at least 1, got {self.workers}")
        if self.address is not None and self.name != "ray":
            raise PersonaError("--ray-address goes with --engine ray")

    @property
    def is_local(self) -> bool:
        return self.name == "local"

    def describe(self) -> dict:
        """What a run records of where it ran."""
        if self.is_local:
            return {"engine": "local"}
        return {"engine": "ray", "workers": self.workers, "ray_address": self.address or "local"}


LOCAL = Engine()


def fan_out(
    engine: Engine,
    make_worker: Callable[[], Worker],
    units: Iterable[Any],
    total: Optional[int] = None,
    progress: Optional[Progress] = None,
    stage: str = "working",
    window: int = 256,
) -> Iterator[Any]:
    """`make_worker()(unit)` for every unit, yielded in unit order (progress counts a result once the
    caller asks for the next one: put fan_out first in a zip, so the last one is counted too).

    Ray takes the units `window` at a time (bounded memory on the driver for a stream of units;
    its actors start once per window) and needs `make_worker` and the units to pickle (cloudpickle:
    a lambda is fine, an open Store or model is not: capture a URI or a loader instead)."""
    engine.validate()
    tick = report(progress)
    done = 0
    tick(stage, 0, total or 0)
    results = _in_process(make_worker, units) if engine.is_local else _on_ray(engine, make_worker, units, window)
    for result in results:
        yield result
        done += 1  # counted once the caller has taken it in: a stop from the progress callback loses nothing done
        tick(stage, done, total or done)


def _in_process(make_worker: Callable[[], Worker], units: Iterable[Any]) -> Iterator[Any]:
    worker = None
    for unit in units:
        worker = worker or make_worker()
        yield worker(unit)


class _RayActor:
    """One Ray Data actor: makes its worker once, then answers batches of pickled units. Whatever
    its worker raises comes back as the unit's result, for the driver to raise as it was raised."""

    def __init__(self, recipe: bytes) -> None:
        import cloudpickle

        try:
            self.worker, self.failure = cloudpickle.loads(recipe)(), None
        except Exception as exc:  # raised again on the driver, with the first unit
            self.worker, self.failure = None, exc

    def __call__(self, batch: dict) -> dict:
        return {"i": batch["i"], "result": [self._answer(unit) for unit in batch["unit"]]}

    def _answer(self, unit: bytes) -> bytes:
        try:
            if self.failure is not None:
                raise self.failure
            return pickle.dumps((True, self.worker(pickle.loads(unit))), protocol=5)
        except Exception as exc:
            try:
                return pickle.dumps((False, exc), protocol=5)
            except Exception:  # an exception that does not pickle still says what happened
                return pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")), protocol=5)


def _on_ray(engine: Engine, make_worker: Callable[[], Worker], units: Iterable[Any], window: int) -> Iterator[Any]:
    ray = start_ray(engine)
    import cloudpickle
    import ray.data

    recipe = cloudpickle.dumps(make_worker)
    iterator = iter(units)
    start = 0
    while chunk := list(itertools.islice(iterator, window)):
        rows = [{"i": start + n, "unit": pickle.dumps(unit, protocol=5)} for n, unit in enumerate(chunk)]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _RayActor, fn_constructor_kwargs={"recipe": recipe}, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(engine.workers, len(rows))), num_cpus=engine.cpus_per_worker,
            num_gpus=engine.gpus_per_worker or None,
        )  # fmt: skip
        for row in dataset.iter_rows():
            done, result = pickle.loads(row["result"])
            if not done:
                raise result
            yield result
        start += len(chunk)


def start_ray(engine: Engine) -> Any:
    """Connect to the cluster at engine.address, or start a local Ray with workers x CPUs; the
    workers see this process's PERSONA_* settings (precision, cache, store)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise PersonaError("--engine ray needs Ray Data: pip install 'persona[ray]'") from None
    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith("PERSONA_")}
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        if engine.address is None:
            options["num_cpus"] = max(1, int(engine.workers * engine.cpus_per_worker))
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # else each actor pool logs a harmless 'E' line
        try:
            with warnings.catch_warnings():  # Ray forks and execs its processes at once: lancedb's fork warning does not apply
                warnings.filterwarnings("ignore", message="lancedb fork support")
                ray.init(address=engine.address, runtime_env={"env_vars": env}, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PersonaError(f"--ray-address {engine.address}: cannot connect to Ray ({str(exc).splitlines()[0]})") from None
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray
