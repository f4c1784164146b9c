"""The synthetic fact world: determinism, unique names, biographies consistent with QA, files."""

import datetime
import json

import pytest

from memlayers.config import ConfigError
from memlayers.data import (
    ATTRIBUTES,
    FactWorldConfig,
    facts,
    generate_world,
    qa_text,
    read_documents,
    read_qa,
    write_world,
)

N = 50


@pytest.fixture(scope="module")
def world():
    return generate_world(FactWorldConfig(n_people=N, seed=3, bios_per_person=3, heldout_people=7))


def bio_sentences(bio: str) -> list[str]:
    """Split a biography into its sentences (no value contains a period)."""
    assert bio.endswith(".")
    return [part + "." for part in bio[:-1].split(". ")]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"n_people": 0}, "n_people"),
        ({"n_people": 10**6}, "n_people"),
        ({"bios_per_person": 0}, "bios_per_person"),
        ({"heldout_people": -1}, "heldout_people"),
        ({"seen_fraction": -0.1}, "seen_fraction"),
        ({"seen_fraction": 1.5}, "seen_fraction"),
        ({"n_people": 5, "heldout_people": 6}, "heldout_people"),
    ],
)
def test_config_rejects_bad_values(overrides, key):
    with pytest.raises(ConfigError) as info:
        FactWorldConfig(**overrides)
    assert info.value.key == key


def test_value_lists_are_clean_and_sized():
    sizes = {
        "FIRST_NAMES": (150, 150),
        "LAST_NAMES": (200, 200),
        "CITIES": (100, 200),
        "UNIVERSITIES": (60, 100),
        "FIELDS": (40, 60),
        "EMPLOYERS": (80, 150),
    }
    for name, (low, high) in sizes.items():
        values = getattr(facts, name)
        assert low <= len(values) <= high, name
        assert len(set(values)) == len(values), f"{name} has duplicates"
        assert all(v.isascii() and v == v.strip() and "." not in v for v in values), name


def test_templates_state_name_and_value():
    for attribute in ATTRIBUTES:
        templates = facts.BIO_TEMPLATES[attribute]
        assert len(templates) >= 4 and len(set(templates)) == len(templates)
        for template in templates:
            assert "{name}" in template and "{value}" in template and template.endswith(".")
            assert not template.startswith("{value}")
        assert "{name}" in facts.QUESTION_TEMPLATES[attribute]
    assert len(set(facts.QUESTION_TEMPLATES.values())) == len(ATTRIBUTES)


def test_people_have_unique_names_and_valid_attributes(world):
    assert len(world.people) == N
    assert len({p.name for p in world.people}) == N
    for person in world.people:
        assert set(person.attributes) == set(ATTRIBUTES)
        date = datetime.datetime.strptime(person.attributes["birth_date"], "%B %d, %Y")
        assert 1900 <= date.year <= 1999
        assert person.attributes["birth_city"] in facts.CITIES
        assert person.attributes["university"] in facts.UNIVERSITIES
        assert person.attributes["field"] in facts.FIELDS
        assert person.attributes["employer"] in facts.EMPLOYERS
    # drawn independently: 50 people spread over many values, not one per person index
    assert len({p.attributes["birth_city"] for p in world.people}) > 20
    assert len({p.attributes["birth_date"][-4:] for p in world.people}) > 20


def test_all_names_unique_at_default_size():
    world = generate_world(FactWorldConfig(heldout_people=0))
    assert len({p.name for p in world.people}) == len(world.people) == 4000


def test_counts(world):
    assert len(world.biographies()) == N * 3
    assert len(world.qa_pairs()) == N * len(ATTRIBUTES)
    assert [len(p) for p in world.splits().values()] == [25, 12, 13]  # seen half, unseen halved
    assert len(world.training_documents()) == N * 3 + 25 * len(ATTRIBUTES)
    assert len(world.heldout_documents()) == len(world.heldout_names()) == 7
    no_qa = generate_world(
        FactWorldConfig(n_people=N, seed=3, bios_per_person=3, seen_fraction=0.0, heldout_people=0)
    )
    assert sorted(no_qa.training_documents()) == sorted(no_qa.biographies())
    all_seen = generate_world(FactWorldConfig(n_people=N, seed=3, seen_fraction=1.0, heldout_people=0))
    assert all_seen.qa_pairs("seen") == all_seen.qa_pairs()
    assert all_seen.qa_pairs("validation") == all_seen.qa_pairs("test") == []


def test_splits_are_disjoint_cover_everyone_and_depend_on_the_seed(world):
    splits = world.splits()
    names = [{p.name for p in people} for people in splits.values()]
    assert sum(len(n) for n in names) == len({p.name for p in world.people}) == N
    assert set.union(*names) == {p.name for p in world.people}
    for split, people in splits.items():
        assert people == [p for p in world.people if p.name in {q.name for q in people}]  # world order
        assert {qa["person"] for qa in world.qa_pairs(split)} == {p.name for p in people}
    other = generate_world(FactWorldConfig(n_people=N, seed=4, bios_per_person=3, heldout_people=7))
    assert [p.name for p in other.splits()["test"]] != [p.name for p in splits["test"]]


def test_no_unseen_question_or_answer_statement_is_trained_on(world):
    """Extraction is honest: the training text holds every seen QA document and no unseen one,
    while every unseen person's facts are still stated in their biographies."""
    docs = world.training_documents()
    text = "\n".join(docs)
    for qa in world.qa_pairs("seen"):
        assert qa_text(qa["question"], qa["answer"]) in docs
    unseen = world.qa_pairs("validation") + world.qa_pairs("test")
    assert unseen
    for qa in unseen:
        assert qa["question"] not in text
        assert qa["answer"] in text  # the fact is there, only in biographies


def test_qa_answers_occur_in_every_biography(world):
    bios = world.biographies()
    qa_pairs = world.qa_pairs()
    for index, person in enumerate(world.people):
        person_bios = bios[index * 3 : (index + 1) * 3]
        person_qa = [qa for qa in qa_pairs if qa["person"] == person.name]
        assert [qa["attribute"] for qa in person_qa] == list(ATTRIBUTES)
        for qa in person_qa:
            assert person.name in qa["question"]
            assert qa["answer"] == person.attributes[qa["attribute"]]
            for bio in person_bios:
                assert qa["answer"] in bio


def test_biography_is_one_paraphrased_sentence_per_attribute(world):
    bios = world.biographies()
    orders, templates_used = set(), set()
    for index, person in enumerate(world.people):
        options = {
            a: [person.sentence(a, t) for t in range(len(facts.BIO_TEMPLATES[a]))]
            for a in ATTRIBUTES
        }
        for bio in bios[index * 3 : (index + 1) * 3]:
            sentences = bio_sentences(bio)
            assert len(sentences) == len(ATTRIBUTES)
            order = []
            for sentence in sentences:
                assert person.name in sentence
                matches = [a for a in ATTRIBUTES if sentence in options[a]]
                assert len(matches) == 1, sentence
                order.append(matches[0])
                templates_used.add((matches[0], options[matches[0]].index(sentence)))
            assert sorted(order) == sorted(ATTRIBUTES)
            orders.add(tuple(order))
    assert len(orders) > 10  # random order
    # every paraphrase gets used
    assert len(templates_used) == sum(len(t) for t in facts.BIO_TEMPLATES.values())


def test_heldout_biographies_are_fresh_and_consistent(world):
    bios = world.biographies()
    index_of = {p.name: i for i, p in enumerate(world.people)}
    names = world.heldout_names()
    assert len(set(names)) == len(names)
    for name, bio in zip(names, world.heldout_documents(), strict=True):
        i = index_of[name]
        assert bio not in bios[i * 3 : (i + 1) * 3]
        for value in world.people[i].attributes.values():
            assert value in bio


def test_training_documents_are_bios_and_seen_qa_shuffled(world):
    docs = world.training_documents()
    qa_docs = [qa_text(qa["question"], qa["answer"]) for qa in world.qa_pairs("seen")]
    unshuffled = world.biographies() + qa_docs
    assert sorted(docs) == sorted(unshuffled)
    assert docs != unshuffled
    assert docs == world.training_documents()  # deterministic


def test_same_seed_gives_identical_files(tmp_path):
    config = FactWorldConfig(n_people=N, seed=11, heldout_people=5)
    a = write_world(generate_world(config), tmp_path / "a")
    b = write_world(
        generate_world(FactWorldConfig(n_people=N, seed=11, heldout_people=5)), tmp_path / "b"
    )
    assert set(a) == {"people", "train", "qa", "qa_seen", "qa_validation", "qa_test", "heldout"}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    c = write_world(
        generate_world(FactWorldConfig(n_people=N, seed=12, heldout_people=5)), tmp_path / "c"
    )
    for name in a:
        assert a[name].read_bytes() != c[name].read_bytes(), name


def test_files_round_trip(world, tmp_path):
    paths = write_world(world, tmp_path / "world")
    assert sorted(p.name for p in (tmp_path / "world").iterdir()) == [
        "heldout.jsonl",
        "people.jsonl",
        "qa.jsonl",
        "qa_seen.jsonl",
        "qa_test.jsonl",
        "qa_validation.jsonl",
        "train.jsonl",
    ]  # no temp files left behind
    assert read_documents(paths["train"]) == world.training_documents()
    assert read_documents(paths["heldout"]) == world.heldout_documents()
    assert read_qa(paths["qa"]) == world.qa_pairs()
    for split in facts.SPLITS:
        assert read_qa(paths[f"qa_{split}"]) == world.qa_pairs(split)
    written = paths["train"].read_text(encoding="utf-8")  # the string check over the files a run reads
    unseen = read_qa(paths["qa_validation"]) + read_qa(paths["qa_test"])
    assert unseen and not [qa["question"] for qa in unseen if qa["question"] in written]
    assert all(qa["question"] in written for qa in read_qa(paths["qa_seen"]))
    lines = paths["people"].read_text(encoding="utf-8").splitlines()
    people = [json.loads(line) for line in lines]
    split_of = {p.name: split for split, group in world.splits().items() for p in group}
    assert people == [{"name": p.name, "split": split_of[p.name], **p.attributes} for p in world.people]
    assert list(people[0]) == ["name", "split", *ATTRIBUTES]


def test_paraphrased_questions_ask_the_same_facts_in_words_never_trained_on(world):
    plain, paraphrased = world.qa_pairs("seen"), world.qa_pairs("seen", paraphrased=True)
    assert [(q["person"], q["attribute"], q["answer"]) for q in plain] == [
        (q["person"], q["attribute"], q["answer"]) for q in paraphrased]
    assert all(a["question"] != b["question"] and b["person"] in b["question"] for a, b in zip(plain, paraphrased, strict=True))
    text = "\n".join(world.training_documents())
    assert all(q["question"] in text for q in plain)  # the seen questions are trained on ...
    assert not any(q["question"] in text for q in paraphrased)  # ... their second wording never


def test_a_second_world_of_new_people_shares_no_name_with_the_first():
    first = generate_world(FactWorldConfig(n_people=3000, seed=0))
    names = {p.name for p in first.people}
    again = generate_world(FactWorldConfig(n_people=3000, seed=1))
    assert names & {p.name for p in again.people}  # without exclusion, worlds share names
    fresh = generate_world(FactWorldConfig(n_people=3000, seed=1), exclude=names)
    assert not names & {p.name for p in fresh.people} and len({p.name for p in fresh.people}) == 3000
    small = FactWorldConfig(n_people=50, seed=0, heldout_people=5)
    assert generate_world(small, exclude=()).people == generate_world(small).people
    total = len(facts.FIRST_NAMES) * len(facts.LAST_NAMES)
    with pytest.raises(ConfigError, match="n_people: must be <="):
        generate_world(FactWorldConfig(n_people=total - 2999, seed=1), exclude=names)
