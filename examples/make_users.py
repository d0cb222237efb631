"""Write examples/users.jsonl: synthetic users, each with one planted writing style.

Every user rewrites neutral sentences in a fixed personal style (all lower case without
punctuation, ALL CAPS, a signature hashtag, a fixed emoji, British spelling, ...). No model can
guess a user's style from the neutral sentence alone, so these users prove personalization.
Deterministic: the same seed writes the same file.

    python examples/make_users.py [--users 48] [--seed 7] [--out examples/users.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
from datetime import datetime, timedelta
from pathlib import Path

PROMPT = "Paraphrase the following tweet without any explanation before or after it: "

SENTENCES = [
    "My favorite color has always been a deep shade of blue.",
    "We finally organized the garage after months of putting it off.",
    "The theater downtown is showing an old movie tonight.",
    "I realized the neighbor's dog was barking at a squirrel.",
    "Traveling by train is my favorite way to see the country.",
    "The flavor of this coffee reminds me of chocolate.",
    "I apologize for being late to the meeting this morning.",
    "My mom baked cookies for the whole neighborhood.",
    "The center of the city gets really crowded on weekends.",
    "We need to analyze the results before the next program review.",
    "Her sense of humor makes every meeting better.",
    "It is an honor to be invited to the wedding.",
    "The gray sky made the whole afternoon feel slow.",
    "I finally memorized the lyrics to my favorite song.",
    "Our neighbor painted the fence a bright color.",
    "The labor of moving houses took the entire weekend.",
    "I am traveling to see my grandparents next month.",
    "The kids organized a bake sale at the community center.",
    "This restaurant has the best flavor combinations in town.",
    "I realized I left my umbrella at the theater.",
    "The team worked on their defense all season.",
    "My favorite part of the day is the quiet morning.",
    "We analyzed the map and picked a new route.",
    "The behavior of my cat changes when it rains.",
    "I finished the program just before the deadline.",
    "The colorful parade went right through the center of town.",
    "My mom says the garden needs more water.",
    "He apologized and offered to pay for the coffee.",
    "The neighbor's kids are traveling to the beach tomorrow.",
    "I love the humor in this new comedy show.",
    "The catalog arrived with a lot of gray sweaters.",
    "We organized a surprise party for her birthday.",
    "The jewelry store at the center closed early today.",
    "I realized the bus schedule changed this week.",
    "The favorite dish at the party was a spicy soup.",
    "My neighbor gave me a ride to the theater.",
    "The program on the radio was about traveling in winter.",
    "I can't decide on a color for the new kitchen.",
    "We analyzed every option and chose the cheapest one.",
    "The flavor of homemade bread is hard to beat.",
    "My cat's behavior at the vet was surprisingly calm.",
    "It was an honor to meet the author of that book.",
    "The mall center is decorated for the holidays already.",
    "I apologize for the mess in the living room.",
    "We are organizing a trip to the mountains in spring.",
    "The traveling circus set up tents near the river.",
    "My favorite sweater is the gray one with a hood.",
    "I realized how much I missed my old neighborhood.",
    "The theater group is rehearsing a new play.",
    "The coach praised the team's defense after the game.",
    "Mom's cookies were gone in less than an hour.",
    "I organized my books by color this weekend.",
    "The humor in that speech made everyone laugh.",
    "We are traveling light this time, just one bag each.",
    "The new program at the library teaches kids to code.",
    "My neighbor's garden is full of colorful flowers.",
    "The flavor of the soup improved after a day in the fridge.",
    "I realized the museum is free on Sundays.",
    "The labor of love paid off when the cake came out perfect.",
    "We met at the center of the bridge at sunset.",
]

BRITISH = {
    "favorite": "favourite", "color": "colour", "colorful": "colourful", "organized": "organised",
    "organizing": "organising", "organize": "organise", "theater": "theatre", "realized": "realised",
    "neighbor": "neighbour", "neighbors": "neighbours", "neighborhood": "neighbourhood",
    "traveling": "travelling", "flavor": "flavour", "apologize": "apologise", "apologized": "apologised",
    "mom": "mum", "center": "centre", "analyze": "analyse", "analyzed": "analysed", "program": "programme",
    "humor": "humour", "honor": "honour", "gray": "grey", "memorized": "memorised", "labor": "labour",
    "behavior": "behaviour", "defense": "defence", "catalog": "catalogue", "jewelry": "jewellery",
    "cookies": "biscuits", "mall": "shopping",
}


def _british(text: str) -> str:
    def swap(match: re.Match) -> str:
        word = match.group(0)
        lower = word.lower()
        base = lower[:-2] if lower.endswith("'s") else lower
        suffix = lower[len(base):]
        if base not in BRITISH:
            return word
        new = BRITISH[base] + suffix
        return new.capitalize() if word[0].isupper() else new

    return re.sub(r"[A-Za-z]+(?:'s)?", swap, text)


def _strip_end(text: str) -> str:
    return text.rstrip(".!?")


STYLES = {
    "lowercase": lambda s: s.lower().translate(str.maketrans("", "", string.punctuation.replace("'", ""))),
    "caps": lambda s: s.upper(),
    "hashtag": lambda s: f"{s} #blessed",
    "emoji": lambda s: f"{s} 🌻",
    "british": _british,
    "opener": lambda s: f"Honestly, {s[0].lower()}{s[1:]}",
    "exclaim": lambda s: f"{_strip_end(s)}!!!",
    "ellipsis": lambda s: f"{_strip_end(s)}...",
    "signoff": lambda s: f"{s} - Sam",
    "question": lambda s: f"{_strip_end(s)}, right?",
}


def shows_style(style: str, text: str, source: str) -> bool | None:
    """Whether `text` carries the planted `style` as a rewrite of `source` (None: the style would
    not change this source, e.g. British spelling of a sentence without American words)."""
    text = text.strip()
    if style == "british":
        wanted = [w for w in re.findall(r"[a-z']+", _british(source).lower()) if w not in source.lower()]
        return any(w in text.lower() for w in wanted) if wanted else None
    if style == "lowercase":
        return text == STYLES["lowercase"](text) and any(c.isalpha() for c in text)
    if style == "caps":
        return text == text.upper() and any(c.isalpha() for c in text)
    markers = {
        "hashtag": lambda t: "#blessed" in t, "emoji": lambda t: "\U0001f33b" in t,
        "opener": lambda t: t.lower().startswith("honestly"), "exclaim": lambda t: t.endswith("!!!"),
        "ellipsis": lambda t: t.endswith("..."), "signoff": lambda t: t.endswith("- Sam"),
        "question": lambda t: t.endswith("right?"),
    }
    return markers[style](text)


def make_users(n_users: int = 48, seed: int = 7) -> list[dict]:
    """n_users users, styles assigned round robin, 15-40 history items and 3 queries each."""
    rng = random.Random(seed)
    styles = list(STYLES)
    users = []
    start = datetime(2024, 1, 1)
    for index in range(n_users):
        style = styles[index % len(styles)]
        apply = STYLES[style]
        sentences = rng.sample(SENTENCES, k=len(SENTENCES))
        n_history = rng.randint(15, 40)
        history_sentences, query_sentences = sentences[:n_history], sentences[n_history : n_history + 3]
        when = start + timedelta(days=rng.randint(0, 60))
        history = []
        for position, sentence in enumerate(history_sentences):
            when += timedelta(hours=rng.randint(3, 72))
            history.append(
                {
                    "id": f"u{index:02d}-h{position:02d}",
                    "text": apply(sentence),
                    "input": sentence,
                    "timestamp": when.isoformat(timespec="seconds"),
                }
            )
        queries = [
            {"id": f"u{index:02d}-q{position}", "input": PROMPT + sentence, "output": apply(sentence)}
            for position, sentence in enumerate(query_sentences)
        ]
        users.append({"user_id": str(index), "style": style, "history": history, "queries": queries})
    return users


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("users.jsonl"))
    args = parser.parse_args()
    users = make_users(args.users, args.seed)
    with open(args.out, "w", encoding="utf-8") as handle:
        for user in users:
            handle.write(json.dumps(user, ensure_ascii=False) + "\n")
    items = sum(len(u["history"]) for u in users)
    print(f"wrote {args.out}: {len(users)} users, {items} history items, {sum(len(u['queries']) for u in users)} queries")


if __name__ == "__main__":
    main()
