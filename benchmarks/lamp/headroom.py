"""How much of a LaMP-7 answer a user's history could add to a copy of the input, in LaMP's ROUGE.

The learned personal parts (OPPU's and Per-Pcs's adapters, PPlug's embedding) do not separate from
their ablations in LaMP's ROUGE-1 (lower-cased words, punctuation dropped). This asks, with no
model, how large the word-level signal they would have to carry is. For the training-split
queries of a LaMP folder (train and dev users of the toolkit's split; the test users are never
read), it measures:
- the gold's words that copying the input misses, and how many of them the user's own history
  uses at all, against a donor's history (a seeded derangement, as `--ablation` draws donors);
- copying the input and appending the words the user's history uses most (in at least a share
  `t` of their items, not already in the input): LaMP's ROUGE-1 against plain copying, with the
  user's own history and with a donor's; the paired difference own - donor is the personal part;
- copying the input cut to the user's usual length (the median words of their items times f).
Paired differences are per query with bootstrap 95% intervals. It runs in seconds.

    .venv/bin/python benchmarks/lamp/headroom.py --data ../shared/data/lamp7 [--seed 0] \\
        [--out benchmarks/lamp/headroom-lamp-7.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHARES = (0.3, 0.4, 0.5, 0.6, 0.7)
"""Thresholds t: a word is appended when at least this share of the history's items use it."""
LENGTH_FACTORS = (1.0, 1.5, 2.0)
"""Factors f: the copy is cut to f times the median words per history item."""


def lamp_words(text: str) -> list[str]:
    """Words as LaMP's ROUGE sees them (rouge-score's tokenizer: lower case, letters and digits)."""
    from rouge_score import tokenize

    return tokenize.tokenize(text, None)


def item_shares(items: list[str]) -> dict[str, float]:
    """Word -> the share of the history's items that use it."""
    counts = Counter(word for text in items for word in set(lamp_words(text)))
    return {word: count / len(items) for word, count in counts.items()}


def appended(copy: str, shares: dict[str, float], threshold: float) -> str:
    """The copy with the history's most used words it lacks appended (most used first)."""
    have = set(lamp_words(copy))
    extra = [word for word, share in sorted(shares.items(), key=lambda kv: (-kv[1], kv[0])) if share >= threshold and word not in have]
    return " ".join([copy, *extra])


def cut(copy: str, words: float, factor: float) -> str:
    """The copy's first round(factor x words) whitespace words (at least 3)."""
    return " ".join(copy.split()[: max(3, round(words * factor))])


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b per query with its bootstrap 95% interval."""
    from recipes.kit.metrics import bootstrap_interval

    diff = [x - y for x, y in zip(a, b)]
    low, high = bootstrap_interval(diff)
    return {"mean": round(statistics.fmean(diff), 4), "ci95": [round(low, 4), round(high, 4)]}


def against_copy(own: list[float], donor: list[float], copy: list[float]) -> dict:
    """One way of answering, with the user's history and with a donor's, against copying the input."""
    return {"own - copy": paired(own, copy), "donor - copy": paired(donor, copy), "own - donor": paired(own, donor)}


def show(difference: dict) -> str:
    """A paired difference as '+0.0022 [+0.0005, +0.0040]'."""
    low, high = difference["ci95"]
    return f"{difference['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def print_rows(header: str, rows: list[dict], key: str, name: str) -> None:
    """A Markdown table of against_copy rows."""
    print(f"| {header} | own - copy | donor - copy | own - donor |\n|---|---|---|---|")
    for row in rows:
        print(f"| {name} = {row[key]} | {show(row['own - copy'])} | {show(row['donor - copy'])} | {show(row['own - donor'])} |")


def training_split(data: Path, task) -> list:
    """(query input to copy, gold, the user's history texts) for the train and dev users."""
    from recipes.kit.inputs import read_lamp_outputs, read_lamp_questions
    from recipes.kit.splits import query_split

    golds = read_lamp_outputs(data / "outputs.json", task)
    rows = []
    for user in read_lamp_questions(data / "questions.json", task, golds):
        [query] = user.queries
        if query.output and user.items and query_split(query.split, user.user_id) != "test":
            rows.append((user.user_id, task.query_text(query.input), query.output, [item.text for item in user.items]))
    return rows


def main() -> None:
    from recipes.kit.metrics import per_example_rouge
    from recipes.kit.retrieval import donors
    from recipes.kit.tasks import get_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a LaMP-7 folder (questions.json, outputs.json)")
    parser.add_argument("--task", default="LaMP-7")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/lamp/headroom-TASK.json")
    args = parser.parse_args()
    started, task = time.perf_counter(), get_task(args.task)
    rows = training_split(args.data, task)
    users = [user for user, *_ in rows]
    donor_of = donors(users, args.seed, "headroom")
    history = {user: items for user, _, _, items in rows}
    shares = {user: item_shares(items) for user, items in history.items()}
    golds = [gold for _, _, gold, _ in rows]

    def rouge1(answers: list[str]) -> list[float]:
        return [r["rouge-1"] for r in per_example_rouge(answers, golds)]

    copy = rouge1([text for _, text, _, _ in rows])
    missed = {"own": [], "donor": []}
    for user, text, gold, _ in rows:
        lacking = set(lamp_words(gold)) - set(lamp_words(text))
        for side, owner in (("own", user), ("donor", donor_of[user])):
            missed[side].append(sum(word in shares[owner] for word in lacking) / len(lacking) if lacking else 0.0)
    result = {
        "task": task.name, "data": str(args.data), "queries": len(rows), "splits": ["train", "dev"], "seed": args.seed,
        "copy_rouge1": round(statistics.fmean(copy), 4),
        "gold_words": round(statistics.fmean(len(set(lamp_words(g))) for g in golds), 2),
        "gold_words_copy_misses": round(statistics.fmean(len(set(lamp_words(g)) - set(lamp_words(t))) for _, t, g, _ in rows), 2),
        "history_words": round(statistics.fmean(len(s) for s in shares.values()), 1),
        "missed_words_in_history": {side: round(statistics.fmean(v), 4) for side, v in missed.items()}
        | {"own - donor": paired(missed["own"], missed["donor"])},
        "append_most_used": [], "cut_to_usual_length": [],
    }  # fmt: skip
    for threshold in SHARES:
        own = rouge1([appended(t, shares[u], threshold) for u, t, _, _ in rows])
        donor = rouge1([appended(t, shares[donor_of[u]], threshold) for u, t, _, _ in rows])
        result["append_most_used"].append({"share": threshold, **against_copy(own, donor, copy)})
    usual = {user: statistics.median(len(text.split()) for text in items) for user, items in history.items()}
    for factor in LENGTH_FACTORS:
        own = rouge1([cut(t, usual[u], factor) for u, t, _, _ in rows])
        donor = rouge1([cut(t, usual[donor_of[u]], factor) for u, t, _, _ in rows])
        result["cut_to_usual_length"].append({"factor": factor, **against_copy(own, donor, copy)})
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = args.out or Path(__file__).with_name(f"headroom-{task.name.lower()}.json")
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"{task.name}: {len(rows)} training-split queries, copying the input ROUGE-1 {result['copy_rouge1']}")
    print(f"gold words {result['gold_words']}, of them the copy misses {result['gold_words_copy_misses']}; "
          f"the user's history ({result['history_words']} words) uses {result['missed_words_in_history']['own']:.1%} "
          f"of those, a donor's {result['missed_words_in_history']['donor']:.1%} (own - donor {show(result['missed_words_in_history']['own - donor'])})")  # fmt: skip
    print_rows("appended: words in >= t of the items", result["append_most_used"], "share", "t")
    print_rows("cut to f x the usual length", result["cut_to_usual_length"], "factor", "f")
    print(f"written: {out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
