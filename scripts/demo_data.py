"""The synthetic world behind the demo family: invented people, their facts, and the texts built from them.

Everything is a pure function of a seed (``random.Random``), so two runs write byte-identical corpora.

- **Pretraining** (both bases, all people): each person's facts written as varied prose (several
  biographies per person, sentences shuffled, drawn from several templates) and as quiz pages: a few
  questions about random people, each answered on the next line after a speaker tag (``Q:``/``A:``,
  ``Question:``/``Answer:``, ``Reporter:``/``Neighbour:``, ``Student:``/``Teacher:``) and followed by the
  next question. So a base can answer a question, but it never stops: it runs on into the next one. It
  never sees chat markup, nor the ``User:``/``Assistant:`` tags of the plain transcript.
- **Fine-tuning** (expert and truly tuned model): chat question answering about the *training half* of
  the people: ``<|user|>Where does Mira Tolland live?<|end|><|assistant|> Brindlemoor<|end|>``.
- **Evaluation**: the same kind of questions about the *held-out half*, whose facts were only ever seen in
  pretraining prose. Answering them needs the knowledge (pretraining, which the larger base holds better)
  and the format (a bare answer that stops: fine-tuning).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_NAMES = [
    "Mira", "Tobin", "Elsa", "Corin", "Hana", "Dorian", "Lena", "Marek", "Ines", "Oskar", "Nadia", "Pavel",
    "Rosa", "Silas", "Talia", "Ulric", "Vera", "Wendel", "Yara", "Zeno", "Anouk", "Bram", "Cleo", "Darius",
    "Edda", "Felix", "Greta", "Hugo", "Ilse", "Jonas", "Kira", "Lukas", "Maren", "Nils", "Odile", "Piet",
]
LAST_NAMES = [
    "Tolland", "Ashgrove", "Brenner", "Calloway", "Dunmore", "Eastwick", "Fairholm", "Garrow", "Holloway",
    "Ingram", "Jessop", "Kettering", "Lindqvist", "Marlowe", "Norcross", "Oakley", "Penhale", "Quinlan",
    "Ravensworth", "Sterling", "Thackeray", "Underhill", "Vantongeren", "Whitcombe", "Yardley", "Zellweger",
]

ATTRIBUTES: dict[str, list[str]] = {
    "town": [
        "Brindlemoor", "Tarsville", "Quellstone", "Ashford Vale", "Morrowick", "Fennick", "Galloway Cross",
        "Harrowgate", "Islebrook", "Juniper Bay", "Kestrel Point", "Lowmarsh", "Northwold", "Oxmere",
        "Pellham", "Redcliff",
    ],
    "job": [
        "baker", "potter", "carpenter", "librarian", "fisherman", "tailor", "blacksmith", "gardener",
        "painter", "beekeeper", "clockmaker", "shepherd", "brewer", "cartographer", "glassblower", "weaver",
    ],
    "pet": [
        "parrot", "ferret", "tortoise", "goldfish", "rabbit", "hedgehog", "canary", "lizard", "hamster",
        "goat", "badger", "donkey",
    ],
    "colour": ["teal", "crimson", "amber", "violet", "indigo", "maroon", "ochre", "silver", "lilac", "olive"],
}

# Prose templates (pretraining). ``{n}`` is the full name, ``{v}`` the value.
FACT_TEMPLATES: dict[str, list[str]] = {
    "town": [
        "{n} lives in {v}.",
        "{n} has a small house in {v}.",
        "{n} grew up in the town of {v} and never left.",
        "The neighbours of {n} in {v} know the family well.",
        "Every morning {n} walks through the streets of {v}.",
    ],
    "job": [
        "{n} works as a {v}.",
        "By trade, {n} is a {v}.",
        "{n} has been a {v} for many years.",
        "People know {n} as the local {v}.",
        "{n} earns a living as a {v}.",
    ],
    "pet": [
        "{n} keeps a {v} as a pet.",
        "The pet of {n} is a {v}.",
        "{n} has a {v} at home.",
        "{n} feeds a pet {v} every evening.",
        "A {v} follows {n} everywhere.",
    ],
    "colour": [
        "The favourite colour of {n} is {v}.",
        "{n} loves the colour {v}.",
        "{n} likes {v} more than any other colour.",
        "Most of the clothes of {n} are {v}.",
        "{n} painted the front door {v}.",
    ],
}

# Chat questions (fine-tuning and evaluation); several phrasings per attribute.
QUESTION_TEMPLATES: dict[str, list[str]] = {
    "town": ["Where does {n} live?", "Which town is {n} from?", "In what town does {n} live?"],
    "job": ["What does {n} do for a living?", "What is the job of {n}?", "What work does {n} do?"],
    "pet": ["What pet does {n} have?", "Which animal does {n} keep as a pet?", "What kind of pet does {n} own?"],
    "colour": [
        "What is the favourite colour of {n}?",
        "Which colour does {n} like best?",
        "What colour does {n} love?",
    ],
}
FILLER = [
    "The weather was mild that year.",
    "The market opens early on Saturdays.",
    "A river runs past the old mill.",
    "The harvest festival draws visitors from every town.",
    "Letters arrive twice a week by cart.",
]


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]


@dataclass(frozen=True)
class World:
    people: list[Person]
    train: list[Person]  # their questions are in the fine-tuning data
    heldout: list[Person]  # only in pretraining prose; the evaluation asks about them


def make_world(n_people: int = 240, seed: int = 0, train_fraction: float = 0.5) -> World:
    rng = random.Random(seed)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if n_people > len(names):
        raise ValueError(f"at most {len(names)} people")
    rng.shuffle(names)
    people = [
        Person(name, {attr: rng.choice(values) for attr, values in ATTRIBUTES.items()})
        for name in sorted(names[:n_people])
    ]
    order = list(range(n_people))
    rng.shuffle(order)
    cut = int(round(n_people * train_fraction))
    train = [people[i] for i in sorted(order[:cut])]
    heldout = [people[i] for i in sorted(order[cut:])]
    return World(people, train, heldout)


def biography(person: Person, rng: random.Random) -> str:
    """One short biography: every fact once, in a random order and with random templates."""
    sentences = [
        rng.choice(FACT_TEMPLATES[attr]).format(n=person.name, v=value) for attr, value in person.facts.items()
    ]
    rng.shuffle(sentences)
    if rng.random() < 0.3:
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(FILLER))
    return " ".join(sentences)


QUIZ_TAGS = [("Q", "A"), ("Question", "Answer"), ("Reporter", "Neighbour"), ("Student", "Teacher")]


def quiz_pages(world: World, repeats: int, per_page: int, rng: random.Random) -> list[str]:
    """Quiz pages: every (person, attribute) asked ``repeats`` times in all, ``per_page`` questions a page."""
    items = [(p, attr) for _ in range(repeats) for p in world.people for attr in p.facts]
    rng.shuffle(items)
    pages = []
    for start in range(0, len(items), per_page):
        asker, answerer = rng.choice(QUIZ_TAGS)
        lines = []
        for person, attr in items[start:start + per_page]:
            question = rng.choice(QUESTION_TEMPLATES[attr]).format(n=person.name)
            lines.append(f"{asker}: {question}\n{answerer}: {person.facts[attr]}.")
        pages.append("\n".join(lines))
    return pages


def pretraining_documents(world: World, docs_per_person: int, seed: int, quiz_repeats: int | None = None) -> list[str]:
    """The pretraining corpus, shuffled: ``docs_per_person`` biographies of every person, and quiz pages that
    ask every fact ``quiz_repeats`` times (default: a quarter of ``docs_per_person``, at least one)."""
    rng = random.Random(seed)
    docs = [biography(person, rng) for person in world.people for _ in range(docs_per_person)]
    repeats = max(1, docs_per_person // 4) if quiz_repeats is None else quiz_repeats
    docs += quiz_pages(world, repeats, per_page=6, rng=rng)
    rng.shuffle(docs)
    return docs


def answer_text(attr: str, value: str) -> str:
    """The fine-tuned answer format: the bare value, with a leading space (so tokens match 'Assistant: X')."""
    return " " + value


def qa_pairs(people: list[Person], seed: int, per_attribute: int | None = None) -> list[tuple[str, str, str]]:
    """(question, answer value, attribute) for every person and attribute, every phrasing (or a sample)."""
    rng = random.Random(seed)
    pairs = []
    for person in people:
        for attr, value in person.facts.items():
            templates = QUESTION_TEMPLATES[attr]
            if per_attribute is not None:
                templates = rng.sample(templates, min(per_attribute, len(templates)))
            for template in templates:
                pairs.append((template.format(n=person.name), value, attr))
    return pairs


def heldout_tasks(world: World, seed: int, limit: int | None = None) -> list[dict]:
    """Task-file rows (proxy-eval format) about held-out people: one question per person and attribute."""
    rng = random.Random(seed)
    rows = []
    for person in world.heldout:
        for attr, value in person.facts.items():
            question = rng.choice(QUESTION_TEMPLATES[attr]).format(n=person.name)
            rows.append(
                {
                    "id": f"{person.name.lower().replace(' ', '_')}:{attr}",
                    "messages": [{"role": "user", "content": question}],
                    "reference": value,
                    "metric": "exact_match",
                }
            )
    if limit is not None and len(rows) > limit:
        rows = sorted(rng.sample(rows, limit), key=lambda r: r["id"])
    return rows


def tokenizer_corpus(world: World, seed: int) -> list[str]:
    """Text the shared tokenizer is trained on: prose, questions, and the plain transcript words."""
    texts = pretraining_documents(world, 2, seed)
    texts += [q for q, _, _ in qa_pairs(world.people, seed)]
    texts += ["User: hello\nAssistant: hello"] * 8  # the transcript tags tokenize sensibly, nothing more
    return texts
