"""Bundled demo tasks for `shira train`: deterministic, no downloads, each with train and held-out splits.

Three small instruction tasks, each testing one skill that exact match can check:

- ``kv2json``  (format transformation): ``color=red; age=31`` -> ``{"color":"red","age":31}``.
- ``sentiment`` (classification label): a templated product review -> ``positive`` or ``negative``.
- ``capitals`` (lookup fact): capitals of invented countries; the held-out split asks the same facts with
  phrasings never seen in training, so it checks that the fact was learned, not the sentence.

Completions are short so SmolLM2-135M with a 1% adapter learns them in minutes on a CPU, and the base model
scores low before training (it cannot know invented facts or this exact output format).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

Record = dict[str, str]

_KEYS = {
    "color": ["red", "blue", "green", "amber", "teal", "violet", "black", "white"],
    "pet": ["cat", "dog", "owl", "fox", "hare", "newt", "crab", "yak"],
    "city": ["Oslo", "Lima", "Pune", "Kobe", "Graz", "Nice", "Bari", "Cork"],
    "tool": ["saw", "drill", "file", "awl", "plane", "rasp", "vise", "lathe"],
    "mood": ["calm", "glad", "tense", "bold", "shy", "keen", "wry", "sunny"],
    "age": None,
    "size": None,
    "price": None,
}
_ITEMS = ["pizza", "hotel room", "phone", "movie", "jacket", "concert", "laptop", "coffee", "novel", "bike",
          "headphones", "backpack", "restaurant", "museum tour", "game", "tent", "blender", "sofa", "train ride",
          "haircut"]
_GOOD = ["was wonderful", "exceeded my expectations", "worked perfectly", "made my day", "was a delight",
         "was worth every penny", "felt premium", "was excellent", "impressed everyone", "was superb"]
_BAD = ["was awful", "broke after a day", "was a waste of money", "disappointed me", "felt cheap",
        "was terrible", "ruined my evening", "never worked properly", "was a letdown", "was dreadful"]
_CLOSERS = ["I bought it last week.", "My cousin chose it.", "It arrived on a Monday.", "We went there in May.",
            "It came in a blue box.", "A friend told me about it.", ""]
_SYLLABLES = ["zor", "va", "mel", "ka", "dri", "ton", "sel", "qui", "bar", "nex", "lu", "fen", "ost", "ri",
              "gal", "dor", "ami", "pek", "tas", "jun", "ulm", "vi", "bro", "cen"]
_COUNTRY_ENDS = ["ia", "land", "stan", "ora", "mark", "ovia"]
_CAPITAL_ENDS = ["burg", "grad", "ville", "port", "holm", "ton"]
_TRAIN_ASKS = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?",
               "{c} is governed from which city?"]
_EVAL_ASKS = ["Tell me the capital of {c}.", "The capital of {c} is which city?"]


@dataclass(frozen=True)
class DemoTask:
    """One demo task: name, the skill it checks, and its generator (rng, train size, eval size) -> splits."""

    name: str
    skill: str
    make: Callable[[random.Random, int, int], tuple[list[Record], list[Record]]]


def _unique(make_one: Callable[[random.Random], Record], rng: random.Random, n: int,
            taken: set[str]) -> list[Record]:
    out: list[Record] = []
    misses = 0
    while len(out) < n:
        rec = make_one(rng)
        if rec["prompt"] in taken:
            misses += 1
            if misses > 2000:  # in a row: the task's space is (nearly) used up
                raise ValueError(f"cannot draw {n} distinct examples (got {len(out)}); ask for fewer")
            continue
        misses = 0
        taken.add(rec["prompt"])
        out.append(rec)
    return out


def _kv_record(rng: random.Random) -> Record:
    keys = rng.sample(sorted(_KEYS), rng.choice([2, 3]))
    pairs: list[tuple[str, object]] = []
    for k in keys:
        choices = _KEYS[k]
        pairs.append((k, rng.choice(choices) if choices else rng.randint(1, 99)))
    source = "; ".join(f"{k}={v}" for k, v in pairs)
    target = json.dumps(dict(pairs), separators=(",", ":"))
    return {"prompt": f"Convert to compact JSON: {source}", "completion": target}


def _kv2json(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Record], list[Record]]:
    taken: set[str] = set()
    return _unique(_kv_record, rng, n_train, taken), _unique(_kv_record, rng, n_eval, taken)


def _review(rng: random.Random) -> Record:
    label = rng.choice(["positive", "negative"])
    phrase = rng.choice(_GOOD if label == "positive" else _BAD)
    review = f"The {rng.choice(_ITEMS)} {phrase}. {rng.choice(_CLOSERS)}".strip()
    prompt = f"Classify the sentiment of this review as positive or negative.\nReview: {review}"
    return {"prompt": prompt, "completion": label}


def _sentiment(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Record], list[Record]]:
    taken: set[str] = set()
    return _unique(_review, rng, n_train, taken), _unique(_review, rng, n_eval, taken)


def _name(rng: random.Random, parts: int, ends: list[str]) -> str:
    return ("".join(rng.choice(_SYLLABLES) for _ in range(parts)) + rng.choice(ends)).capitalize()


def capital_facts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n distinct (invented country, invented capital) pairs."""
    countries: dict[str, str] = {}
    capitals: set[str] = set()
    while len(countries) < n:
        country, capital = _name(rng, 2, _COUNTRY_ENDS), _name(rng, 1, _CAPITAL_ENDS)
        if country not in countries and capital not in capitals:
            countries[country] = capital
            capitals.add(capital)
    return list(countries.items())


def _capitals(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Record], list[Record]]:
    # Every fact appears in both splits; only the phrasing differs, so eval checks recall of the fact.
    n_facts = max(1, min(n_train // len(_TRAIN_ASKS), n_eval // len(_EVAL_ASKS) or 1))
    facts = capital_facts(rng, n_facts)
    train = [{"prompt": ask.format(c=c), "completion": cap} for c, cap in facts for ask in _TRAIN_ASKS]
    held = [{"prompt": ask.format(c=c), "completion": cap} for c, cap in facts for ask in _EVAL_ASKS]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


TASKS: dict[str, DemoTask] = {
    "kv2json": DemoTask("kv2json", "format transformation: key=value list to compact JSON", _kv2json),
    "sentiment": DemoTask("sentiment", "classification: review sentiment as one label", _sentiment),
    "capitals": DemoTask("capitals", "lookup fact: capitals of invented countries, held-out phrasing", _capitals),
}
DEFAULT_SIZES = {"kv2json": (256, 64), "sentiment": (256, 64), "capitals": (96, 48)}


def generate(task: str, seed: int = 0, n_train: int | None = None,
             n_eval: int | None = None) -> tuple[list[Record], list[Record]]:
    """The train and held-out splits of one demo task; the same arguments always give the same records.

    Args:
        task: kv2json, sentiment or capitals.
        seed: everything random derives from it.
        n_train, n_eval: split sizes (capitals rounds them to whole facts times phrasings).

    Returns:
        (train, eval) lists of {"prompt", "completion"} records with no prompt in both.
    """
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; use one of {', '.join(TASKS)}")
    d_train, d_eval = DEFAULT_SIZES[task]
    n_train, n_eval = n_train or d_train, n_eval or d_eval
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"split sizes must be positive, got train={n_train}, eval={n_eval}")
    rng = random.Random(f"{task}:{seed}")
    return TASKS[task].make(rng, n_train, n_eval)
