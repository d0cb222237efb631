"""Training pairs made from history items: a task-format input and the user's own output.

A LaMP query is one question; a user's history holds dozens of items that show how they
answer. An item becomes a pair in one of three ways:
- it carries its own input (users.jsonl items with `input`), used as it is (recipe `given`);
- its fields hold both sides (LaMP-2N: the article and the category the journalist gave it;
  LaMP-4: article and headline; ...), put into the task's own query wording (recipe `fields`);
- LaMP-7 tweets have no input: one is synthesized by seeded rule-based rewriting that undoes
  what makes a tweet personal (mentions, hashtags, emoticons, chat spellings, elongations,
  shouting, missing capitals), so the pair teaches how this user departs from plain text
  (recipe `rules`, seeded).
Pairs are stored (`pairs` table) with a digest of the item they came from; a changed item is
made again. A pair whose output equals a dev or test query's gold is never made.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import replace
from typing import Optional

from recipes import PersonaError
from recipes.kit.splits import query_split
from recipes.kit.tasks import Task
from store import Behavior, HistoryPair, Store

PAIR_RECIPES = ("none", "rules")
"""`none`: items without an input train by language modelling on their text (the old way);
`rules`: every item that can be made a pair is one (given inputs, field pairs, rewritten tweets)."""
REWRITE_VERSION = 1  # bump when the rewriting changes: stored pairs of the old rules are not reused


def recipe_id(recipe: str, seed: int) -> str:
    """The stored recipe name: what made the pairs, its version and seed."""
    return f"{recipe}-v{REWRITE_VERSION}-seed{seed}"


def check_recipe(recipe: str, option: str = "--pairs") -> None:
    if recipe not in PAIR_RECIPES:
        raise PersonaError(f"{option} {recipe}: expected one of {', '.join(PAIR_RECIPES)}")


# ---------- LaMP-7: a plain-text input for a tweet ----------

_URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
_LEADING_MENTIONS = re.compile(r"^(\s*@\w+[:,]?)+\s*")
_MENTION = re.compile(r"@(\w+)")
_HASHTAG = re.compile(r"#(\w+)")
_EMOTICON = re.compile(r"(?<!\w)(?:[:;=8xX][-'^o]?[)(\]\[dDpP/\\|*oO3]+|<3+|\*[a-zA-Z]{1,4}\*|\^_?\^|-_-|[oO]_[oO])(?!\w)")
_EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\ufe0f]")
_ELONGATED = re.compile(r"([a-zA-Z])\1{2,}")
_REPEATED_PUNCTUATION = re.compile(r"([!?.,])\1+")
_INTERJECTION = re.compile(r"(?<!\w)(?:lol+|lmao+|rofl|haha(?:ha)*|hehe(?:he)*|omg|ugh+|argh+)(?!\w)[,.!]*", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_SHOUTING = re.compile(r"\b[A-Z][A-Z']+(?:\W+[A-Z][A-Z']+)+\b")  # two or more capitalized words in a row; one alone may be an acronym
_GLUED = re.compile(r"([.!?,])(?=[A-Za-z])")
CHAT_SPELLINGS = {
    "u": "you", "ur": "your", "r": "are", "im": "I'm", "i": "I", "dont": "don't", "cant": "can't", "wont": "won't",
    "didnt": "didn't", "doesnt": "doesn't", "isnt": "isn't", "ive": "I've", "ill": "I'll", "id": "I'd", "thats": "that's",
    "idk": "I don't know", "btw": "by the way", "thx": "thanks", "thanx": "thanks", "pls": "please", "plz": "please",
    "2nite": "tonight", "tonite": "tonight", "nite": "night", "gr8": "great", "b4": "before", "w/": "with",
    "tho": "though", "cuz": "because", "coz": "because", "bc": "because", "wanna": "want to", "gonna": "going to",
    "gotta": "have to", "ya": "you", "ppl": "people", "bday": "birthday", "tmrw": "tomorrow", "2day": "today",
    "2morrow": "tomorrow", "luv": "love", "yr": "year", "yrs": "years", "msg": "message", "pic": "picture",
}  # fmt: skip
_WORD = re.compile(r"(?<![\w'/])([A-Za-z0-9/]+)(?![\w'])")


def rewrite_tweet(text: str, rng: random.Random) -> str:
    """A plain version of a tweet, as a paraphrasing instruction would give it: what is personal
    in it rewritten or dropped. Optional rewrites are drawn from `rng`, so seeds differ."""
    plain = text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    plain = _URL.sub("", plain)
    if rng.random() < 0.7:
        plain = _LEADING_MENTIONS.sub("", plain)
    plain = _MENTION.sub(lambda m: m.group(1) if rng.random() < 0.5 else m.group(0), plain)
    plain = _HASHTAG.sub(r"\1", plain)
    plain = _EMOJI.sub("", _EMOTICON.sub("", plain))
    plain = _INTERJECTION.sub("", plain)
    plain = _ELONGATED.sub(r"\1", plain)
    plain = _REPEATED_PUNCTUATION.sub(lambda m: "." if m.group(1) == "." and rng.random() < 0.5 else m.group(1), plain)
    plain = _WORD.sub(lambda m: CHAT_SPELLINGS.get(m.group(1).lower(), m.group(1)), plain)
    plain = _SHOUTING.sub(lambda m: m.group(0).lower(), plain)
    plain = _SPACES.sub(" ", _GLUED.sub(r"\1 ", plain)).strip(" ,;:-")
    if not plain:
        return ""
    plain = plain[0].upper() + plain[1:]
    return plain if plain[-1] in ".!?" else plain + "."


# ---------- one item to one pair ----------


def item_digest(item: Behavior) -> str:
    """What a pair was made from: the item's text and fields."""
    return hashlib.sha256(repr((item.text, sorted(item.fields.items()))).encode()).hexdigest()[:16]


def given_pair(task: Task, item: Behavior) -> Optional[tuple[str, str]]:
    """An item's own (task prompt, target) when it carries an `input`: that input in the task's
    wording, and its `output` field or else its text. None for an item without an input."""
    given = item.fields.get("input")
    if not (isinstance(given, str) and given.strip()):
        return None
    source, answer = item_sides(task, item)  # type: ignore[misc]  # an item with an input always has both sides
    return task.item_prompt(source), answer


def item_sides(task: Task, item: Behavior) -> Optional[tuple[str, str]]:
    """An item's own (input, answer) before any task wording: its `input` with its `output` (or
    its text) where it carries an input; the task's pair fields where its items hold both sides;
    None otherwise (a tweet has no input; history reuse reads it as its own answer)."""
    given = item.fields.get("input")
    if isinstance(given, str) and given.strip():
        output = item.fields.get("output")
        return given, output if isinstance(output, str) and output.strip() else item.text
    if task.pair_fields:
        source, answer = task.pair_fields
        values = {"text": item.text, **item.fields}
        if values.get(source) and values.get(answer) is not None and str(values[answer]).strip():
            return str(values[source]).strip(), str(values[answer]).strip()
    return None


def make_pair(task: Task, item: Behavior, rng: random.Random) -> Optional[tuple[str, str]]:
    """(task-format input, output) of one history item, or None where the item cannot be a pair."""
    given = given_pair(task, item)
    if given is not None:
        return given
    if task.pair_fields:
        sides = item_sides(task, item)
        return None if sides is None else (task.query_template.format(input=sides[0]), sides[1])
    if task.name == "LaMP-7":
        plain = rewrite_tweet(item.text, rng)
        return (task.query_template.format(input=plain), item.text.strip()) if plain else None
    return None


def synthesize(task: Task, items: list[Behavior], recipe: str, seed: int, forbidden: frozenset[str] = frozenset()) -> list[HistoryPair]:
    """Pairs of one user's items; each item's rewriting is seeded by (seed, user, item), so a
    pair does not change when other items are added. Outputs in `forbidden` are never made."""
    name = recipe_id(recipe, seed)
    pairs = []
    for item in items:
        rng = random.Random(f"{seed}\n{item.user_id}\n{item.item_id}")
        made = make_pair(task, item, rng)
        if made is None or _norm(made[1]) in forbidden:
            continue
        pairs.append(HistoryPair(item.user_id, task.name, item.item_id, name, item_digest(item), made[0], made[1]))
    return pairs


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def held_out_golds(store: Store, task: Task) -> frozenset[str]:
    """Gold outputs of the queries outside the training split (dev, test): never a training target."""
    return frozenset(_norm(q.output) for q in store.task_queries(task.name) if q.output and query_split(q.split, q.user_id) != "train")


# ---------- stored pairs ----------


def history_pairs(
    store: Store, task: Task, histories: dict[str, list[Behavior]], recipe: str = "rules", seed: int = 0
) -> dict[str, list[HistoryPair]]:
    """Every user's pairs: stored ones whose item is unchanged, the rest made now and stored in one write."""
    check_recipe(recipe)
    if recipe == "none" or not histories:
        return {user: [] for user in histories}
    stored = store.get_pairs(list(histories), task.name, recipe_id(recipe, seed))
    forbidden = held_out_golds(store, task)
    result, new = {}, []
    for user, items in histories.items():
        cached = {p.item_id: p for p in stored.get(user, [])}
        fresh = [i for i in items if i.item_id not in cached or cached[i.item_id].source_digest != item_digest(i)]
        made = synthesize(task, fresh, recipe, seed, forbidden)
        new += made
        by_item = {**cached, **{p.item_id: p for p in made}}
        result[user] = [by_item[i.item_id] for i in items if i.item_id in by_item and _norm(by_item[i.item_id].output) not in forbidden]
    store.put_pairs(new)
    return result


def with_pair_inputs(histories: dict[str, list[Behavior]], pairs: dict[str, list[HistoryPair]]) -> dict[str, list[Behavior]]:
    """The histories with each paired item carrying its pair as `input`/`output`, so every trainer
    that reads items with inputs trains on the pairs (items without a pair stay as they are)."""
    result = {}
    for user, items in histories.items():
        by_item = {p.item_id: p for p in pairs.get(user, [])}
        result[user] = [
            replace(item, fields={**item.fields, "input": by_item[item.item_id].input, "output": by_item[item.item_id].output})
            if item.item_id in by_item else item
            for item in items
        ]  # fmt: skip
    return result


def paired_histories(store: Store, task: Task, histories: dict[str, list[Behavior]], recipe: str, seed: int) -> dict[str, list[Behavior]]:
    """`histories` as the trainers should see them under `recipe` (unchanged for `none`)."""
    if recipe == "none":
        return histories
    return with_pair_inputs(histories, history_pairs(store, task, histories, recipe, seed))
