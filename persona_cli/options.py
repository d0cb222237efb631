"""Every option more than one command takes, defined once: what it is called, its default, its help."""

from __future__ import annotations

import typer

METHOD_HELP = (
    "Prompt methods: none, random, rag, pag. Model methods: task-lora, oppu, peft-retrieval, perpcs, pplug, style-vector. "
    "A personal model method with a prompt method: e.g. oppu+rag. See `persona methods`."
)
ABLATION_HELP = (
    "Serve a personal method's non-personal ablation: random: another user's history (seeded derangement), chosen the same "
    "way; rag: another user's history (seeded derangement), chosen the same way; oppu: the task base of the OPPU adapters; "
    "perpcs: uniform gates: every sharer's pieces, equal weights; pplug: another user's history (seeded derangement); "
    "style-vector: every user steered by the mean style vector of the users served."
)
"""--method's and --ablation's help as the method registry makes them (registry.method_help(),
ablation_help()), written out: making them imports every method, and so torch and transformers, a
few seconds before any help could show. A test checks they are still the registry's."""

PairsOption = typer.Option(
    "none", "--pairs",
    help="How history items train: none (items without an input by language modelling) or rules (every item made a "
    "task-format pair: its own input, its fields, or for tweets a seeded plain rewrite; see `persona pairs show`).",
)  # fmt: skip
JsonOption = typer.Option(False, "--json", help="Print a JSON object for scripts instead of tables.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu or cuda[:N].")
MethodOption = typer.Option("none", "--method", help=METHOD_HELP)
PluginOption = typer.Option(None, "--plugin", help="The model method's stored plug-in: its name, or the group of per-user adapters (default: METHOD-TASK; `persona methods`).")
BaseOption = typer.Option(None, "--base", help="Run a prompt method on this stored plug-in, e.g. task-lora-LaMP-7.")
PoolOption = typer.Option(None, "--pool", help="Methods that read the piece pool: its tag or version (default: the newest).")
TopKOption = typer.Option(None, "--top-k", help="Methods that mix pool pieces or sharers: how many (`persona methods`).")
AblationOption = typer.Option(False, "--ablation", help=ABLATION_HELP)
SetOption = typer.Option(None, "--set", help="A method's own setting, NAME=VALUE (repeatable; `persona methods` lists them).")
KOption = typer.Option(1, "--k", help="History items in the prompt (random, rag).")
RetrieverOption = typer.Option("bm25", "--retriever", help="rag: bm25, recency or dense.")
MinSimilarityOption = typer.Option(None, "--min-similarity", help="rag: show only retrieved items whose cosine similarity to the input (the store's encoder) is at least this; none may pass.")
AnswerOption = typer.Option("auto", "--answer", help="auto (rank for label tasks), rank or generate.")
BeamsOption = typer.Option(None, "--beams", help="Beam search with N beams (default: the task's; 1 is greedy).")
NoRepeatOption = typer.Option(None, "--no-repeat-ngram", help="Never repeat an n-gram of the answer itself (0: off; the prompt is not counted).")
RepetitionOption = typer.Option(None, "--repetition-penalty", help="Penalize tokens the answer already used (1.0: off; the prompt is not counted).")
LengthRatioOption = typer.Option(None, "--length-ratio", help="At most RATIO x the input's tokens + 8 new tokens (default: the task's max only).")
LengthPenaltyOption = typer.Option(None, "--length-penalty", help="With --beams: beam scores are log-probability / length^P (1.0: the default; below 1 prefers shorter answers).")
ReuseOption = typer.Option(
    None, "--reuse-history",
    help="Answer an input that nearly repeats one of the user's history items with that item's own answer, when their "
    "ROUGE-1 overlap is at least MIN (0-1); the method answers the rest. With --ablation, a donor's history.",
)  # fmt: skip
SpellingsOption = typer.Option(
    None, "--user-spellings",
    help="Spell common words of the LLM's answer the way the user's history does (u for you, im for I'm) where it uses "
    "that spelling at least MIN times and more often than the standard word. With --ablation, a donor's history.",
)  # fmt: skip
TaskOption = typer.Option(..., "--task", help="Task whose data trains the adapter, e.g. LaMP-7.")
LlmOption = typer.Option(None, "--llm", help="HF causal or seq2seq LM, name or path (default: embedded SmolLM2-135M-Instruct).")
ROption = typer.Option(8, "--r", help="LoRA rank.")
AlphaOption = typer.Option(8.0, "--alpha", help="LoRA alpha (scale alpha/r).")
DropoutOption = typer.Option(0.05, "--dropout", help="LoRA dropout.")
TargetsOption = typer.Option(None, "--target-modules", help="Comma-separated module names (default: the attention projections).")
MaxLengthOption = typer.Option(256, "--max-length", help="Tokens per training example (prompt and target).")
SeedOption = typer.Option(0, "--seed", help="Seeds initialization, dropout and batch order.")
AutoBaseOption = typer.Option("auto", "--base", help="Base plug-in (default: task-lora-TASK when stored; 'none' for the bare LLM).")
PrecisionOption = typer.Option("auto", "--precision", help="auto (bfloat16 mixed precision where supported), float32 or bfloat16.")
MaxMinutesOption = typer.Option(None, "--max-minutes", help="Stop after this many minutes of training (evaluating once more), keeping the best step.")
EngineOption = typer.Option("local", "--engine", help="local (this process) or ray (fan the per-user work out with Ray Data; pip install 'persona[ray]').")
RayAddressOption = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help="--engine ray: the cluster to join, e.g. HEAD:6379 from a node of it (default: a local Ray on this machine).")
WorkersOption = typer.Option(2, "--workers", min=1, help="--engine ray: workers (Ray actors), each with its own models.")
