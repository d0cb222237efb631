"""Registry of LaMP tasks: labels, document fields, query extraction, prompt templates, metrics.

Everything that differs between LaMP tasks lives here, so that retrieval, prompting,
generation and scoring stay task-agnostic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from recipes import PersonaError
from recipes.kit import metrics as lamp_metrics
from recipes.kit.decoding import GREEDY, Decoding

CLASSIFICATION, RATING, GENERATION = "classification", "rating", "generation"

MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)  # fmt: skip
NEWS_CATEGORIES = (
    "women", "religion", "politics", "style & beauty", "entertainment", "culture & arts", "sports",
    "science & technology", "travel", "business", "crime", "education", "healthy living", "parents",
    "food & drink",
)  # fmt: skip


@dataclass(frozen=True)
class Task:
    """A LaMP task, or a custom generation task whose items carry their own `text`.

    `item_template` formats one retrieved history item for a RAG prompt (LaMP style: the item
    together with the user's own answer for it); `query_marker` is the text after which the
    input holds the part that retrieval searches with; `rank_template` is how a label is
    written when labels are ranked by likelihood (the way the item template writes them);
    `decoding` is how its answers are decoded unless a run says otherwise; `query_template` is
    the task's own wording of a question around its input; `pair_fields` names the (input, answer)
    fields of a history item that make it a training pair in that wording (history_pairs).
    """

    name: str
    doc_fields: tuple[str, ...]
    description: str
    kind: str = GENERATION
    labels: tuple[str, ...] = ()
    query_marker: str | None = None
    rag_header: str = "Items from this user's history:"
    item_template: str = '"{text}"'
    pag_instruction: str = "Describe this user's interests and writing style in two or three sentences, based on their past items."
    max_new_tokens: int = 64
    decoding: Decoding = GREEDY
    rank_template: str = "{label}"
    lamp_name: str | None = field(default=None)
    query_template: str = "{input}"
    pair_fields: tuple[str, str] | None = None

    # ---------- documents and queries ----------

    def document(self, item: dict) -> str:
        """The text embedded and retrieved for one history item of this task."""
        parts = [str(item[f]).strip() for f in self.doc_fields if item.get(f) is not None]
        return " ".join(p for p in parts if p)

    def query_text(self, task_input: str) -> str:
        """The part of a LaMP input that retrieval searches with (the whole input if no marker is found)."""
        if self.name == "LaMP-1":
            refs = re.findall(r'\[\d\]\s*:\s*"(.*?)"', task_input, flags=re.DOTALL)
            if refs:
                return " ".join(refs)
        if self.query_marker:
            position = task_input.lower().find(self.query_marker.lower())
            if position >= 0:
                rest = task_input[position + len(self.query_marker) :].strip()
                if rest:
                    return rest
        return task_input

    def item_prompt(self, item_input: str) -> str:
        """A history item's own input as a query of this task (LaMP's wording), for training in task format."""
        if self.query_marker and self.query_marker.lower() in item_input.lower():
            return item_input
        return self.query_template.format(input=item_input)

    def render_item(self, item: dict, text: str) -> str:
        """One history item as a line of a RAG prompt; missing fields render as empty strings."""
        values = {key: "" if value is None else str(value) for key, value in item.items()}
        values["text"] = values.get("text") or text
        return self.item_template.format_map(_Blank(values))

    # ---------- answers and metrics ----------

    @property
    def is_classification(self) -> bool:
        """True when answers come from a fixed label set (which also makes ranking possible)."""
        return self.kind in (CLASSIFICATION, RATING)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return {CLASSIFICATION: ("accuracy", "f1"), RATING: ("mae", "rmse")}.get(self.kind, ("rouge-1", "rouge-L"))

    @property
    def supplementary_metric_names(self) -> tuple[str, ...]:
        """Measures reported beside LaMP's, never instead of them: for generation the cased ROUGE-1
        (LaMP's ROUGE cannot see case and punctuation, much of a tweet's personal style)."""
        return () if self.is_classification else (lamp_metrics.CASED_ROUGE_1,)

    def normalize(self, output: str) -> str:
        """Map a free-form answer onto the task's label set where that is unambiguous.

        A generated text keeps its first paragraph, without a leading announcement such as
        "Here is the paraphrased tweet:" and without quotes around the whole answer. A label answer is trimmed of quotes, brackets
        and a final period and matched case-insensitively; otherwise the label the text
        mentions first is the answer. Text that names no label stays as written (and scores
        as wrong, as in LaMP).
        """
        text = output.strip()
        if not self.is_classification:
            return _clean_generation(text)
        first_line = text.splitlines()[0].strip() if text else ""
        core = first_line.strip(" \t\"'`*.").lower()
        by_lower = {label.lower(): label for label in self.labels}
        for candidate in (core, core.strip("[]"), f"[{core.strip('[]')}]"):
            if candidate in by_lower:
                return by_lower[candidate]
        if self.kind == RATING:
            number = re.match(r"^\s*([0-9](?:\.[0-9]+)?)\b", core)
            return number.group(1) if number else first_line
        found = [(m.start(), -len(label), label) for label in self.labels
                 for m in [re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", text.lower())] if m]  # fmt: skip
        return min(found)[2] if found else first_line

    def rank_answers(self) -> list[str]:
        """The labels as the candidate answers that ranking scores."""
        return [self.rank_template.format(label=label) for label in self.labels]

    def score(self, predictions: list[str], golds: list[str]) -> dict[str, float]:
        """LaMP's metrics of this task over (prediction, gold) pairs, then the supplementary ones."""
        if self.kind == CLASSIFICATION:
            return lamp_metrics.classification_metrics(predictions, golds, list(self.labels))
        if self.kind == RATING:
            return lamp_metrics.rating_metrics(predictions, golds, list(self.labels))
        scores = lamp_metrics.per_example_generation_scores(predictions, golds)
        return {measure: float(sum(values) / len(values)) for measure, values in scores.items()}

    def check_golds(self, golds: list[tuple[str, str]]) -> None:
        """(query id, gold) pairs that the task's metric can read, checked before any model loads: a
        label outside the task's set or an unreadable rating is the user's error, found now rather
        than as a traceback after all the generation."""
        if self.kind == GENERATION or not golds:
            return
        values = [gold for _, gold in golds]
        try:
            self.score(values, values)
        except ValueError:
            for query_id, gold in golds:  # one scoring pass normally; per query only to name the culprit
                try:
                    self.score([gold], [gold])
                except ValueError as exc:
                    raise PersonaError(f"query {query_id}: {exc}") from None
            raise

    def higher_is_better(self, metric: str) -> bool:
        return metric not in ("mae", "rmse")


_ANNOUNCEMENT = re.compile(
    r"^(here is|here's|sure[,!.]?|the paraphrased|paraphrased|paraphrase|rewritten|the rewritten|new|the new"
    r"|title|subject|headline|tweet)[^:\n]{0,50}:\s*",
    flags=re.IGNORECASE,
)


def _clean_generation(text: str) -> str:
    """First paragraph, minus a leading announcement and quotes wrapping the whole answer."""
    text = text.split("\n\n", 1)[0].strip()
    text = _ANNOUNCEMENT.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


class _Blank(dict):
    """format_map helper: a field the item lacks renders as an empty string, not a KeyError."""

    def __missing__(self, key: str) -> str:
        return ""


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "LaMP-1", ("title", "abstract"), "citation identification", CLASSIFICATION, ("[1]", "[2]"),
            rag_header="Titles of papers this author has written:", item_template='"{title}"',
            pag_instruction="Describe in two or three sentences the research topics of the author of these papers.",
            max_new_tokens=8, lamp_name="LaMP_1",
        ),
        Task(
            "LaMP-2", ("description",), "movie tagging", CLASSIFICATION, MOVIE_TAGS, "description:",
            rag_header="How this user tagged other movies:", item_template='"{tag}" is the tag of the movie "{description}"',
            pag_instruction="Describe in two or three sentences what kinds of movies this user tags and how.",
            max_new_tokens=24, rank_template='"{label}"', lamp_name="LaMP_2", pair_fields=("description", "tag"),
            query_template="Which tag does this movie relate to among the following tags? Just answer with the tag name "
            f"without further explanation. tags: [{', '.join(MOVIE_TAGS)}] description: {{input}}",
        ),
        Task(
            "LaMP-2N", ("text",), "news categorization", CLASSIFICATION, NEWS_CATEGORIES, "article:",
            rag_header="How this journalist categorized other articles:",
            item_template='"{category}" is the category of the article "{text}"',
            pag_instruction="Describe in two or three sentences which topics this journalist writes about and how they categorize them.",
            max_new_tokens=24, rank_template='"{label}"', lamp_name="LaMP_2N", pair_fields=("text", "category"),
            query_template="Which category does this article relate to among the following categories? Just answer with the "
            f"category name without further explanation. categories: [{', '.join(NEWS_CATEGORIES)}] article: {{input}}",
        ),
        Task(
            "LaMP-3", ("text",), "product rating", RATING, ("1", "2", "3", "4", "5"), "review:",
            rag_header="This user's other reviews and the scores they gave:", item_template='{score} is the score for "{text}"',
            pag_instruction="Describe in two or three sentences how this user rates products and what they value.",
            max_new_tokens=8, lamp_name="LaMP_3", pair_fields=("text", "score"),
            query_template="What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
            "without further explanation. review: {input}",
        ),
        Task(
            "LaMP-4", ("title", "text"), "news headline generation", query_marker="article:",
            rag_header="Headlines this journalist wrote for other articles:", item_template='"{title}" is the title for "{text}"',
            pag_instruction="Describe in two or three sentences the style of the headlines this journalist writes.",
            max_new_tokens=32, lamp_name="LaMP_4", query_template="Generate a headline for the following article: {input}",
            pair_fields=("text", "title"),
        ),
        Task(
            "LaMP-5", ("title", "abstract"), "scholarly title generation", query_marker="abstract:",
            rag_header="Titles this scholar gave other papers:", item_template='"{title}" is the title for "{abstract}"',
            pag_instruction="Describe in two or three sentences the research topics and title style of this scholar.",
            max_new_tokens=32, lamp_name="LaMP_5", query_template="Generate a title for the following abstract of a paper: {input}",
            pair_fields=("abstract", "title"),
        ),
        Task(
            "LaMP-6", ("text",), "email subject generation", query_marker="email:",
            rag_header="Subjects this user wrote for other emails:", item_template='"{title}" is the subject for "{text}"',
            pag_instruction="Describe in two or three sentences how this user writes email subjects.",
            max_new_tokens=32, lamp_name="LaMP_6", query_template="Generate a subject for the following email: {input}",
            pair_fields=("text", "title"),
        ),
        Task(
            "LaMP-7", ("text",), "tweet paraphrasing", query_marker="before or after it:",
            rag_header="Tweets this user has written:", item_template='"{text}"',
            pag_instruction="Describe in two or three sentences the writing style of the person who wrote these tweets (tone, punctuation, capitalization, hashtags, emoji, typical phrases).",
            max_new_tokens=64, lamp_name="LaMP_7",
            query_template="Paraphrase the following tweet without any explanation before or after it: {input}",
        ),
    ]
}  # fmt: skip

CUSTOM = Task("custom", ("text",), "your own users.jsonl items")


def canonical_task_name(name: str) -> str:
    """'LaMP_7', 'lamp7', 'LaMP-7' -> 'LaMP-7'; names that are not LaMP's pass through unchanged."""
    match = re.fullmatch(r"lamp[-_ ]?(\d)([a-z]?)", name.strip(), flags=re.IGNORECASE)
    if not match:
        return name.strip()
    return f"LaMP-{match.group(1)}{match.group(2).upper()}"


def get_task(name: str) -> Task:
    """The registered LaMP task, or a custom generation task (items carry `text`) for any other name."""
    canonical = canonical_task_name(name)
    if canonical in TASKS:
        return TASKS[canonical]
    if canonical.startswith("LaMP-"):
        raise PersonaError(f"unknown LaMP task '{name}'; known: {', '.join(TASKS)}")
    if not canonical:
        raise PersonaError("task name is empty")
    return Task(canonical, CUSTOM.doc_fields, CUSTOM.description)
