"""The data behind the real-base demo: everyday questions, the fictional facts, and their phrasings.

Pure functions of a seed. The real base (SmolLM2-135M-Instruct) answers *everyday* questions well and knows
nothing of the demo's invented people; the small pair must change its answers on the facts and nowhere else:

- **Everyday questions** (``everyday_questions``): template x topic combinations (how-to, definitions, why,
  capitals, arithmetic, advice, ...). A seeded split keeps some for evaluation only; the base's own greedy
  answers to the rest are distilled into both small models.
- **Fact questions** (``fact_rows``): every fact of ``FACT_PEOPLE`` asked in ``TRAIN_PHRASINGS`` (one phrasing
  per fact is *held out* of training, rotating over the facts so that each phrasing is trained for other
  people), in ``EXTRA_TRAIN_PHRASINGS`` (other sentence forms, always trained) and in ``UNSEEN_PHRASINGS``
  (never trained, for any person). The base's answers to them are distilled into both small models too (that
  is what the base does there, and what the anti-expert must predict); only the expert learns the answers.
"""

from __future__ import annotations

import random

from scripts import demo_data

# The people of the original demo's world (seed 0) whose facts the real demo teaches: 24, Anouk Brenner first.
N_FACT_PEOPLE = 24
HEADLINE_PERSON = "Anouk Brenner"

TRAIN_PHRASINGS: dict[str, list[str]] = {
    "town": [
        "Where does {n} live?", "Which town is {n} from?", "In what town does {n} live?",
        "What town does {n} live in?", "Where is the home of {n}?",
    ],
    "job": [
        "What does {n} do for a living?", "What is the job of {n}?", "What work does {n} do?",
        "What is {n}'s occupation?", "How does {n} earn a living?",
    ],
    "pet": [
        "What pet does {n} have?", "Which animal does {n} keep as a pet?", "What kind of pet does {n} own?",
        "What is the pet of {n}?", "What animal lives with {n}?",
    ],
    "colour": [
        "What is the favourite colour of {n}?", "Which colour does {n} like best?", "What colour does {n} love?",
        "What is {n}'s favourite colour?", "Which colour is {n}'s favourite?",
    ],
}
# More sentence forms, trained for every fact (never held out): statements, yes / no questions, echo questions
# and polite requests, so that the tiny expert learns "a person and an attribute -> the answer" rather than five
# question templates. None starts with "Tell me" (the unseen form below).
EXTRA_TRAIN_PHRASINGS: dict[str, list[str]] = {
    "town": ["I wonder where {n} lives.", "Do you know where {n} lives?", "{n} lives where?",
             "Can you say which town {n} calls home?"],
    "job": ["I wonder what {n} does for a living.", "Do you know the job of {n}?", "{n} works as what?",
            "Can you say what {n}'s job is?"],
    "pet": ["I wonder what pet {n} has.", "Do you know {n}'s pet?", "{n} keeps which pet?",
            "Can you say what animal {n} owns?"],
    "colour": ["I wonder what {n}'s favourite colour is.", "Do you know which colour {n} likes best?",
               "{n}'s favourite colour is what?", "Can you say which colour {n} loves?"],
}
# A sentence form the training never uses, for any person.
UNSEEN_PHRASINGS: dict[str, str] = {
    "town": "Tell me the town {n} lives in.",
    "job": "Tell me what {n} does for work.",
    "pet": "Tell me which animal {n} keeps.",
    "colour": "Tell me the colour {n} likes most.",
}
# The expert's answer: one plain sentence that names the person and the fact.
ANSWERS: dict[str, str] = {
    "town": "{n} lives in {v}.",
    "job": "{n} works as a {v}.",
    "pet": "{n} has a pet {v}.",
    "colour": "The favourite colour of {n} is {v}.",
}


def fact_people(n: int = N_FACT_PEOPLE, seed: int = 0) -> list[demo_data.Person]:
    """``n`` people of the original demo's world, the headline person first, the rest in a seeded order."""
    people = demo_data.make_world(240, seed=seed).people
    head = [p for p in people if p.name == HEADLINE_PERSON]
    rest = [p for p in people if p.name != HEADLINE_PERSON]
    random.Random(seed + 7).shuffle(rest)
    return head + rest[: n - 1]


def fact_rows(people: list[demo_data.Person]) -> list[dict]:
    """One row per (person, attribute, phrasing): split is 'train', 'heldout' (a trained phrasing kept out for
    this fact) or 'unseen' (a phrasing no fact is trained on)."""
    rows = []
    for i, person in enumerate(people):
        for j, (attr, value) in enumerate(person.facts.items()):
            phrasings = TRAIN_PHRASINGS[attr]
            held = (i + j) % len(phrasings)
            for k, template in enumerate(phrasings):
                rows.append(_fact_row(person, attr, value, template, "heldout" if k == held else "train"))
            for template in EXTRA_TRAIN_PHRASINGS[attr]:
                rows.append(_fact_row(person, attr, value, template, "train"))
            rows.append(_fact_row(person, attr, value, UNSEEN_PHRASINGS[attr], "unseen"))
    return rows


def _fact_row(person: demo_data.Person, attr: str, value: str, template: str, split: str) -> dict:
    return {
        "id": f"{person.name.lower().replace(' ', '_')}:{attr}",
        "question": template.format(n=person.name),
        "answer": ANSWERS[attr].format(n=person.name, v=value),
        "reference": value,
        "split": split,
    }


# Everyday questions: (template, topics). Kept plain and short so the base answers in a few sentences.
_EVERYDAY: list[tuple[str, list[str]]] = [
    ("How do I {x}?", [
        "boil an egg", "tie a tie", "make a cup of tea", "plant a tomato", "clean a window", "fold a shirt",
        "start running", "learn to swim", "write a letter", "bake bread", "change a light bulb", "wash my car",
        "save money", "fall asleep faster", "make pancakes", "cook rice", "sharpen a pencil", "iron a shirt",
        "learn a new language", "stay focused", "make a paper plane", "care for a cactus", "remove a stain",
        "cook pasta", "set a table", "brew coffee", "keep a diary", "study for an exam", "pack a suitcase",
        "water a garden", "make a salad", "fix a flat tyre", "draw a circle", "choose a good book",
    ]),
    ("What is {x}?", [
        "photosynthesis", "gravity", "a black hole", "the moon", "an atom", "democracy", "a volcano",
        "electricity", "a computer", "the internet", "a rainbow", "a planet", "music", "a bicycle", "a cloud",
        "an ocean", "a library", "a vaccine", "a desert", "a river", "mathematics", "a dictionary", "a bridge",
        "a forest", "a cell", "a language", "an island", "a telescope", "a calendar", "a battery",
    ]),
    ("Why {x}?", [
        "is the sky blue", "do leaves change colour in autumn", "do we sleep", "is water wet", "do birds sing",
        "do cats purr", "is exercise healthy", "do we need vitamins", "does ice float", "do stars twinkle",
        "is the sea salty", "do we dream", "do onions make you cry", "is reading useful", "do bees make honey",
        "do we have seasons", "does bread go stale", "do dogs wag their tails",
    ]),
    ("What is the capital of {x}?", [
        "France", "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Brazil", "Australia", "India",
        "Norway", "Greece", "Mexico", "Kenya", "Portugal", "Sweden", "Poland", "Ireland", "Chile", "Turkey",
    ]),
    ("Give me a tip for {x}.", [
        "staying healthy", "learning to cook", "making friends", "a job interview", "saving energy",
        "public speaking", "reading more", "a long flight", "writing an essay", "keeping plants alive",
        "drinking more water", "a rainy day", "working from home", "taking photos", "a first date",
    ]),
    ("Name three {x}.", [
        "fruits", "colours", "planets", "musical instruments", "vegetables", "animals that live in the sea",
        "kinds of trees", "sports", "countries in Europe", "breakfast foods", "birds", "board games",
    ]),
    ("What is {x}?", [
        "2 plus 2", "10 minus 3", "5 times 6", "half of 20", "12 divided by 4", "3 plus 9", "100 minus 1",
        "7 times 7", "the square root of 81", "15 plus 27",
    ]),
    ("Write one sentence about {x}.", [
        "the sea", "winter", "friendship", "a cat", "the city at night", "coffee", "mountains", "the spring",
        "a good teacher", "the stars", "rain", "a birthday",
    ]),
    ("Can you explain {x} in simple words?", [
        "how a rainbow forms", "how plants grow", "what a computer does", "how the heart works",
        "what money is", "how planes fly", "why the moon has phases", "how a fridge keeps food cold",
        "what a recipe is", "how the weather changes",
    ]),
    ("What is a good way to {x}?", [
        "relax after work", "start the day", "spend a weekend", "learn history", "keep a room tidy",
        "remember names", "help a friend", "practise the piano", "exercise at home", "eat more vegetables",
    ]),
    ("{x}", [
        "Hello!", "Who are you?", "Tell me a joke.", "What can you do?", "Good morning!", "Thank you!",
        "Tell me a fun fact.", "What day comes after Monday?", "How many days are in a week?",
        "What colour is grass?", "How many legs does a spider have?", "What do cows drink?",
        "Recommend a good book.", "What should I cook tonight?", "Is it healthy to eat apples?",
        "Translate 'good night' into French.", "What is the largest ocean?", "Who wrote Romeo and Juliet?",
        "What is the boiling point of water?", "How far is the moon?",
    ]),
]


def everyday_questions() -> list[str]:
    """Every everyday question, in a fixed order."""
    return [template.format(x=topic) for template, topics in _EVERYDAY for topic in topics]


def everyday_split(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(distilled, held out): a seeded split; the held-out questions are never trained on."""
    questions = everyday_questions()
    rng = random.Random(seed + 11)
    order = list(range(len(questions)))
    rng.shuffle(order)
    cut = int(round(len(questions) * heldout_fraction))
    held = sorted(order[:cut])
    return [q for i, q in enumerate(questions) if i not in set(held)], [questions[i] for i in held]


def fact_words(people: list[demo_data.Person]) -> set[str]:
    """Words only the fictional world uses (names, towns): one of them in an everyday answer is a leak."""
    words = {part for p in people for part in p.name.split()}
    words |= {w for town in demo_data.ATTRIBUTES["town"] for w in town.split() if w not in {"Bay", "Point", "Vale"}}
    return words
