"""Synthetic biographies: the knowledge-learning testbed of PIT (section 3.4, "bioS").

Following "Physics of Language Models 3.1" (Allen-Zhu and Li, 2023), which PIT reuses for
its controlled study: fictional people with six attributes (birth date, birth city,
university, major, employer, employer city; the employer city is the employer's seat, as in
bioS), a biography written from several templates per attribute, and one QA pair per
attribute.  Augmentations (bioS "multi", "permute", "fullname"): several biographies per
person, sentences in a random order, the full name in every sentence instead of a pronoun.
Everything is deterministic for a seed; the train/test split is over people, and test
people's QA pairs are only ever used for evaluation.

Word lists live in :mod:`tessera.data.bios_words` (written for this project).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tessera.data import bios_words as W
from tessera.errors import InputError

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

# Sentence templates per attribute: {name} is the full name or a pronoun (capitalised at a sentence start).
SENTENCES = {
    "birth_date": (
        "{name} was born on {birth_date}.",
        "{name} came into this world on {birth_date}.",
        "{name} celebrates a birthday on {birth_date}.",
        "{name}'s life began on {birth_date}.",
        "{name} was born on the day of {birth_date}.",
    ),
    "birth_city": (
        "{name} was born in {birth_city}.",
        "{name} spent the early years in {birth_city}.",
        "{name} is a native of {birth_city}.",
        "{name} grew up in the city of {birth_city}.",
        "{name} has {birth_city} as a birthplace.",
    ),
    "university": (
        "{name} studied at {university}.",
        "{name} received an education at {university}.",
        "{name} graduated from {university}.",
        "{name} attended {university}.",
        "{name} completed a degree at {university}.",
    ),
    "major": (
        "{name} majored in {major}.",
        "{name} focused on {major} during the studies.",
        "{name} chose {major} as the field of study.",
        "{name} specialised in {major}.",
        "{name} earned a degree in {major}.",
    ),
    "employer": (
        "{name} worked for {employer}.",
        "{name} was employed by {employer}.",
        "{name} held a job at {employer}.",
        "{name} built a career at {employer}.",
        "{name} joined the staff of {employer}.",
    ),
    "employer_city": (
        "{name} worked in {employer_city}.",
        "{name} had a job in {employer_city}.",
        "{name} commuted to an office in {employer_city}.",
        "{name} spent the working years in {employer_city}.",
        "{name} was based in {employer_city} for work.",
    ),
}

QUESTIONS = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "Which city was {name} born in?",
    "university": "Which university did {name} study at?",
    "major": "What did {name} major in?",
    "employer": "Which company did {name} work for?",
    "employer_city": "In which city did {name} work?",
}


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    gender: str  # "f" or "m": picks the pronoun
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str

    def attribute(self, name: str) -> str:
        return getattr(self, name)

    @property
    def pronoun(self) -> str:
        return "she" if self.gender == "f" else "he"


def _company_cities(seed: int) -> dict[str, str]:
    """Each company's seat (bioS: the work city follows from the employer)."""
    rng = random.Random(f"company-cities:{seed}")
    return {c: rng.choice(W.CITIES) for c in W.COMPANIES}


def make_people(n: int, seed: int = 0) -> list[Person]:
    """``n`` fictional people with unique full names and independent random attributes."""
    max_n = (len(W.FIRST_NAMES_FEMALE) + len(W.FIRST_NAMES_MALE)) * len(W.MIDDLE_NAMES) * len(W.LAST_NAMES)
    if not 1 <= n <= max_n // 2:
        raise InputError(f"n_people must be between 1 and {max_n // 2}, got {n}")
    rng = random.Random(f"people:{seed}")
    seats = _company_cities(seed)
    names: set[str] = set()
    people = []
    while len(people) < n:
        gender = rng.choice("fm")
        first = rng.choice(W.FIRST_NAMES_FEMALE if gender == "f" else W.FIRST_NAMES_MALE)
        name = f"{first} {rng.choice(W.MIDDLE_NAMES)} {rng.choice(W.LAST_NAMES)}"
        if name in names:
            continue
        names.add(name)
        employer = rng.choice(W.COMPANIES)
        people.append(Person(
            id=f"p{len(people):05d}", name=name, gender=gender,
            birth_date=f"{rng.choice(W.MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 2000)}",
            birth_city=rng.choice(W.CITIES), university=rng.choice(W.UNIVERSITIES), major=rng.choice(W.MAJORS),
            employer=employer, employer_city=seats[employer]))
    return people


def biography(person: Person, rng: random.Random, permute: bool = False, fullname: bool = False,
              attributes: tuple[str, ...] = ATTRIBUTES) -> str:
    """One biography: a random template per attribute, in bioS order unless ``permute``.

    The first sentence names the person; later ones use the pronoun unless ``fullname``.
    """
    return biography_spans(person, rng, permute, fullname, attributes)[0]


def biography_spans(person: Person, rng: random.Random, permute: bool = False, fullname: bool = False,
                    attributes: tuple[str, ...] = ATTRIBUTES) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    """:func:`biography` and the ``(attribute, start, end)`` character span of every attribute value in it."""
    order = list(attributes)
    if permute:
        rng.shuffle(order)
    values = {a: person.attribute(a) for a in ATTRIBUTES}
    text, spans = "", []
    for i, attr in enumerate(order):
        template = rng.choice(SENTENCES[attr])
        who = person.name if (i == 0 or fullname) else person.pronoun
        if template.startswith("{name}'s") and who == person.pronoun:
            template = template.replace("{name}'s", "his" if person.gender == "m" else "her", 1)
        head, tail = template.split("{" + attr + "}")
        s = head.format(name=who)
        s = s[0].upper() + s[1:]
        start = len(text) + (1 if text else 0) + len(s)
        sentence = s + values[attr] + tail.format(name=who)
        text = f"{text} {sentence}" if text else sentence
        spans.append((attr, start, start + len(values[attr])))
    return text, tuple(spans)


def qa_pairs(person: Person, attributes: tuple[str, ...] = ATTRIBUTES) -> list[dict]:
    """One question per attribute (bioS QA), answer = the attribute's value."""
    return [{"id": f"{person.id}:{a}", "doc_id": person.id, "question": QUESTIONS[a].format(name=person.name),
             "answer": person.attribute(a), "attribute": a} for a in attributes]


def build_bios(n_people: int = 200, test_fraction: float = 0.5, seed: int = 0, bios_per_person: int = 1,
               permute: bool = False, fullname: bool = False, attributes: tuple[str, ...] | list[str] = ATTRIBUTES):
    """The testbed as a :class:`~tessera.data.knowledge.KnowledgeSet`.

    ``bios_per_person`` > 1 with ``permute``/``fullname`` gives bioS's augmented variants
    ("multi5+permute+fullname").  Test people are a seeded random ``test_fraction``.
    ``attributes`` (default: all six, as bioS) may name a subset to make biographies shorter
    (a CPU saving for real-model runs); the people are the same for a seed either way.
    """
    attributes = tuple(attributes)
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        raise InputError(f"unknown or no attributes {unknown}; choose from {', '.join(ATTRIBUTES)}")
    from tessera.data.knowledge import KnowledgeDoc, KnowledgeQA, KnowledgeSet, split_entities

    if bios_per_person < 1:
        raise InputError(f"bios_per_person must be at least 1, got {bios_per_person}")
    people = make_people(n_people, seed)
    rng = random.Random(f"bios:{seed}")
    docs = [KnowledgeDoc(id=f"{p.id}/{k}", text=text, entity=p.id, spans=spans)
            for p in people for k in range(bios_per_person)
            for text, spans in [biography_spans(p, rng, permute, fullname, attributes)]]
    qa = [KnowledgeQA(**row) for p in people for row in qa_pairs(p, attributes)]
    test = split_entities([p.id for p in people], test_fraction, seed)
    meta = {"source": "bios", "n_people": n_people, "bios_per_person": bios_per_person, "permute": permute,
            "fullname": fullname, "seed": seed, "attributes": list(attributes)}
    return KnowledgeSet(documents=docs, qa=qa, test_entities=test, meta=meta)
