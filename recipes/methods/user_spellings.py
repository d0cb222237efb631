"""User spellings: the answer spells common words the way the user's own history does ('u' for
'you', 'im' for "I'm", 'ppl' for 'people'), where that history prefers the short spelling.

A small model paraphrasing for a user writes standard English; many users do not, and ROUGE counts
their words. Each user's own written answers (a tweet; an item's `output`; the task's answer
field) say which chat spellings they use: a spelling is adopted when it appears at least
`min_count` times there and more often than the standard word. The spellings known are those the
`rules` training pairs undo (history_pairs.CHAT_SPELLINGS) and some more of the same kind, fixed
here, not learned from any gold. It is a stage any method's generated answers pass through
(`--user-spellings MIN`), not a method of its own; its non-personal ablation reads a donor's
history (the derangement every ablation uses), so what it adds is the user's own habits at work.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Optional

from recipes import PersonaError
from recipes.kit.history_pairs import CHAT_SPELLINGS, item_sides
from recipes.kit.tasks import Task
from store import Behavior

MORE_SPELLINGS = {
    "da": "the", "dis": "this", "dat": "that", "n": "and", "2": "to", "4": "for", "b": "be", "y": "why",
    "wit": "with", "nw": "now", "ok": "okay", "vid": "video", "lil": "little", "bout": "about",
    "cause": "because", "cos": "because", "bro": "brother", "sis": "sister", "bf": "boyfriend",
    "gf": "girlfriend", "fb": "facebook", "thru": "through", "gud": "good", "wat": "what", "wut": "what",
    "wen": "when", "hav": "have", "kno": "know", "txt": "text", "jus": "just", "tmr": "tomorrow",
}  # fmt: skip
"""Chat spellings beside CHAT_SPELLINGS (short form -> standard word)."""


_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)?")
"""A word as spellings see it: letters and digits, with one apostrophe part (I'm, don't, I’m)."""


def _key(word: str) -> str:
    """How a word is looked up and counted: lowercase, a typographic apostrophe as a plain one."""
    return word.replace("\u2019", "'").lower()


def _spellings() -> dict[str, tuple[str, ...]]:
    """Standard word (lowercase) -> the short spellings of it; one-word standards only."""
    variants: dict[str, list[str]] = {}
    for short, standard in {**CHAT_SPELLINGS, **MORE_SPELLINGS}.items():
        short, standard = short.lower(), standard.lower()
        if " " not in standard and short != standard and _WORD.fullmatch(short):
            variants.setdefault(standard, []).append(short)
    return {standard: tuple(shorts) for standard, shorts in variants.items()}


SPELLINGS: dict[str, tuple[str, ...]] = _spellings()


def own_words(task: Task, item: Behavior) -> str:
    """What the user wrote in one history item: its answer side (history_pairs.item_sides), or its text."""
    sides = item_sides(task, item)
    return sides[1] if sides is not None else item.text


def user_spellings(task: Task, history: list[Behavior], min_count: int) -> dict[str, str]:
    """Standard word -> the short spelling this history uses at least `min_count` times and more
    often than the standard word (the most used short spelling where it has several)."""
    counts = Counter(_key(word) for item in history for word in _WORD.findall(own_words(task, item)))
    adopted = {}
    for standard, shorts in SPELLINGS.items():
        short = max(shorts, key=lambda s: counts[s])
        if counts[short] >= min_count and counts[short] > counts[standard]:
            adopted[standard] = short
    return adopted


def respell(text: str, spellings: dict[str, str]) -> str:
    """`text` with each word in `spellings` replaced by its short spelling; a capitalized word
    stays capitalized ('You' -> 'U')."""
    if not spellings:
        return text

    def swap(match: re.Match) -> str:
        word = match.group(0)
        short = spellings.get(_key(word))
        if short is None:
            return word
        return short[0].upper() + short[1:] if word[0].isupper() else short

    return _WORD.sub(swap, text)


def check_spellings(task: Task, min_count: Optional[int]) -> None:
    """Respelling is for generated text: a count of at least 1 (None: no respelling), on a generation task."""
    if min_count is not None and min_count < 1:
        raise PersonaError(f"--user-spellings is how often the history must use a spelling, at least 1, got {min_count}")
    if min_count is not None and task.is_classification:
        raise PersonaError(f"--user-spellings respells generated text; {task.name} answers with labels")


def respelled_answers(
    task: Task, answers: list[str], user_ids: list[str], histories: dict[str, list[Behavior]], min_count: int
) -> tuple[list[str], int]:
    """Each answer respelled by its user's spellings (`histories` maps each user to the history to
    read: their own, or a donor's for the ablation); also how many answers changed."""
    check_spellings(task, min_count)
    by_user = {user: user_spellings(task, histories.get(user, []), min_count) for user in set(user_ids)}
    out = [respell(answer, by_user[user]) for answer, user in zip(answers, user_ids)]
    return out, sum(a != b for a, b in zip(answers, out))
