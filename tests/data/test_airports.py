"""The real-facts set: airports of the airportsdata package as text and split QA files."""

from __future__ import annotations

import json

import pytest

from memlayers.config import ConfigError
from memlayers.data import read_documents, read_qa
from memlayers.data.airports import (
    ATTRIBUTES,
    AirportFactsConfig,
    load_airports,
    write_airport_facts,
)
from memlayers.data.text import qa_text

pytest.importorskip("airportsdata")


def test_the_package_gives_thousands_of_airports_with_unique_names():
    airports = load_airports()
    assert len(airports) > 5000
    assert len({a["name"] for a in airports}) == len(airports)
    assert all(len(a["iata"]) == 3 and len(a["icao"]) == 4 and a["elevation"].endswith(" feet") for a in airports)
    denver = [a for a in airports if a["iata"] == "DEN"]
    assert denver and denver[0]["icao"] == "KDEN" and denver[0]["region"] == "Colorado"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_airport_facts(AirportFactsConfig(n_airports=40, docs_per_airport=3), tmp_path_factory.mktemp("airports"))


def test_splits_partition_the_airports_and_unseen_questions_are_never_trained_on(files):
    airports = [json.loads(line) for line in files["airports"].read_text().splitlines()]
    assert len(airports) == 40 and [sum(a["split"] == s for a in airports) for s in ("seen", "validation", "test")] == [20, 10, 10]
    train = read_documents(files["train"])
    text = files["train"].read_text(encoding="utf-8")
    by_split = {split: read_qa(files[f"qa_{split}"]) for split in ("seen", "validation", "test")}
    for qa in by_split["seen"]:
        assert qa_text(qa["question"], qa["answer"]) in train
    for qa in by_split["validation"] + by_split["test"]:
        assert qa["question"] not in text and qa["answer"] in text
    names = [{qa["airport"] for qa in pairs} for pairs in by_split.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert len(train) == 40 * 3 + 20 * len(ATTRIBUTES)


def test_every_description_states_every_fact_of_its_airport(files):
    airports = [json.loads(line) for line in files["airports"].read_text().splitlines()]
    descriptions = [doc for doc in read_documents(files["train"]) if not doc.startswith("Question:")]
    assert len(descriptions) == 120
    for airport in airports:
        own = [d for d in descriptions if d.startswith(airport["name"]) or f" {airport['name']} " in f" {d} "]
        assert len(own) >= 3
        for doc in own[:3]:
            assert all(airport[a] in doc for a in ATTRIBUTES)
    assert len(set(descriptions)) > 100  # paraphrases and sentence orders vary


def test_the_files_are_a_function_of_the_config(files, tmp_path):
    again = write_airport_facts(AirportFactsConfig(n_airports=40, docs_per_airport=3), tmp_path / "a")
    other = write_airport_facts(AirportFactsConfig(n_airports=40, docs_per_airport=3, seed=1), tmp_path / "b")
    for name, path in files.items():
        assert again[name].read_bytes() == path.read_bytes(), name
        assert other[name].read_bytes() != path.read_bytes(), name


@pytest.mark.parametrize(("kwargs", "key"), [({"n_airports": 0}, "n_airports"), ({"n_airports": 10**6}, "n_airports"),
                                             ({"docs_per_airport": 0}, "docs_per_airport"),
                                             ({"seen_fraction": 2.0}, "seen_fraction")])
def test_config_errors(kwargs, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        write_airport_facts(AirportFactsConfig(**kwargs), tmp_path)
    assert info.value.key == key
