"""The synthetic-biography testbed: deterministic, consistent, split by person."""

from __future__ import annotations

import pytest

from tessera.data.bios import ATTRIBUTES, build_bios, make_people
from tessera.errors import InputError


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b = build_bios(30, seed=3, bios_per_person=2, permute=True), build_bios(30, seed=3, bios_per_person=2, permute=True)
    assert a.documents == b.documents and a.qa == b.qa and a.test_entities == b.test_entities
    c = build_bios(30, seed=4, bios_per_person=2, permute=True)
    assert [d.text for d in c.documents] != [d.text for d in a.documents]


def test_people_attributes_and_qa():
    people = make_people(120, seed=0)
    assert len({p.name for p in people}) == 120  # unique full names
    seats = {}
    for p in people:  # the employer city is the employer's seat (bioS)
        assert seats.setdefault(p.employer, p.employer_city) == p.employer_city
    kset = build_bios(40, seed=1)
    assert len(kset.qa) == 40 * len(ATTRIBUTES)
    for q in kset.qa:
        doc = kset.documents_of(q.doc_id)[0].text
        assert q.answer in doc  # every answer is stated in the person's biography
        assert doc.split(" ")[0] in q.question and q.attribute in ATTRIBUTES


def test_split_is_by_person_and_covers_everyone():
    kset = build_bios(50, test_fraction=0.4, seed=2, bios_per_person=3)
    assert len(kset.test_entities) == 20
    assert {d.entity for d in kset.test_docs} == set(kset.test_entities)
    assert not {q.doc_id for q in kset.train_qa} & kset.test_entities
    assert {q.doc_id for q in kset.test_qa} == set(kset.test_entities)
    assert len(kset.test_docs) == 60 and len(kset.documents) == 150


def test_augmentations():
    plain = build_bios(10, seed=0)
    for d, p in zip(plain.documents, make_people(10, seed=0)):  # name once, then pronouns, bioS order
        assert d.text.count(p.name) == 1
        first, *rest = d.text.split(". ")
        assert p.name in first and p.birth_date in first and p.employer_city in rest[-1]
    full = build_bios(10, seed=0, fullname=True)
    for d, p in zip(full.documents, make_people(10, seed=0)):
        assert d.text.count(p.name) == len(ATTRIBUTES)
    multi = build_bios(10, seed=0, bios_per_person=4, permute=True)
    texts = [d.text for d in multi.documents_of("p00000")]
    assert len(texts) == 4 and len(set(texts)) == 4


def test_bad_sizes():
    with pytest.raises(InputError):
        build_bios(0)
    with pytest.raises(InputError):
        build_bios(10, bios_per_person=0)
    with pytest.raises(InputError):
        build_bios(10, test_fraction=1.0)
