"""Real facts: airports of the world (the ``airportsdata`` package), as text and QA files.

The synthetic fact world tests memory on facts drawn uniformly at random;
this set brings real ones, with their real skew and structure (codes that
share prefixes within a country, regions and time zones that follow each
other, elevations of every magnitude). Each of ``n_airports`` airports with
an IATA code (drawn by ``seed`` from the ~7,000 the package lists) has five
facts: its IATA code, ICAO code, region, elevation and time zone. The
training text holds ``docs_per_airport`` descriptions per airport, each with
its sentences in a fresh order and a random paraphrase of each, and the
question/answer documents of the seen airports; the questions of the others
are the validation and test splits, exactly as in :mod:`memlayers.data.facts`.

The files are what a user would bring (``.jsonl`` text and QA files), to be
trained and evaluated through the command line::

    memlayers train tiny data.train=OUT/train.jsonl data.qa.recall=OUT/qa_seen.jsonl \\
        data.qa.extraction=OUT/qa_test.jsonl

``airportsdata`` is an optional dependency (``pip install 'memlayers[facts]'``).
"""

from __future__ import annotations

import csv
import importlib.resources
import random
from dataclasses import dataclass
from pathlib import Path

from memlayers.config import check
from memlayers.data.facts import SPLITS, split_indices
from memlayers.data.text import DataError, qa_text, write_jsonl

ATTRIBUTES = ("iata", "icao", "region", "elevation", "time_zone")
"""The facts of every airport, in the order of its QA pairs."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "iata": ("The IATA code of {name} is {value}.", "{name} has the IATA code {value}.",
             "Travellers book flights to {name} under the code {value}."),
    "icao": ("The ICAO code of {name} is {value}.", "{name} has the ICAO identifier {value}.",
             "Pilots know {name} by its ICAO code {value}."),
    "region": ("{name} is located in {value}.", "{name} lies in the region of {value}.",
               "The region of {name} is {value}."),
    "elevation": ("{name} sits at an elevation of {value}.", "The elevation of {name} is {value}.",
                  "{name} is {value} above sea level."),
    "time_zone": ("{name} keeps the time of the {value} time zone.", "The time zone of {name} is {value}.",
                  "Clocks at {name} follow {value}."),
}
"""Paraphrases of each fact's sentence; every one names the airport and states the exact value."""

QUESTIONS = {
    "iata": "What is the IATA code of {name}?",
    "icao": "What is the ICAO code of {name}?",
    "region": "In which region is {name}?",
    "elevation": "What is the elevation of {name}?",
    "time_zone": "What is the time zone of {name}?",
}


@dataclass
class AirportFactsConfig:
    """Which airports, how many descriptions of each, which of their questions are trained on."""

    n_airports: int = 500
    seed: int = 0
    docs_per_airport: int = 5
    seen_fraction: float = 0.5
    """Airports whose question/answer pairs are training documents (recall); the rest are
    halved into validation and test (extraction)."""

    def __post_init__(self) -> None:
        check(self.n_airports >= 1, "n_airports", f"must be >= 1, got {self.n_airports}")
        check(1 <= self.docs_per_airport <= 100, "docs_per_airport", f"must be in [1, 100], got {self.docs_per_airport}")
        check(0.0 <= self.seen_fraction <= 1.0, "seen_fraction", f"must be in [0, 1], got {self.seen_fraction}")


def load_airports() -> list[dict[str, str]]:
    """Every airport of ``airportsdata`` with an IATA code and all five facts, one per unique
    name, as ``{"name", <attribute>: value}`` (elevation in feet, e.g. ``"5431 feet"``)."""
    try:
        source = importlib.resources.files("airportsdata").joinpath("airports.csv")
    except ModuleNotFoundError:
        raise DataError("the airport facts need the airportsdata package: pip install 'memlayers[facts]'") from None
    with source.open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    airports, names = [], {}
    for row in rows:
        if not (row["iata"] and row["icao"] and row["subd"] and row["tz"] and row["elevation"] and row["name"]):
            continue
        names[row["name"]] = names.get(row["name"], 0) + 1
        airports.append({"name": row["name"], "iata": row["iata"], "icao": row["icao"], "region": row["subd"],
                         "elevation": f"{int(float(row['elevation']))} feet", "time_zone": row["tz"]})
    return [a for a in airports if names[a["name"]] == 1]  # a question must name one airport


def _description(airport: dict[str, str], rng: random.Random) -> str:
    order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
    return " ".join(rng.choice(TEMPLATES[a]).format(name=airport["name"], value=airport[a]) for a in order)


def _qa(airport: dict[str, str]) -> list[dict[str, str]]:
    return [{"question": QUESTIONS[a].format(name=airport["name"]), "answer": airport[a],
             "airport": airport["name"], "attribute": a} for a in ATTRIBUTES]


def write_airport_facts(config: AirportFactsConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write ``airports.jsonl``, ``train.jsonl`` and ``qa_<split>.jsonl`` (:data:`SPLITS`)
    into ``out_dir``; returns name -> path. A pure function of ``config`` (and the package's data)."""
    everyone = load_airports()
    check(config.n_airports <= len(everyone), "n_airports",
          f"must be <= {len(everyone)} (the airports with every fact), got {config.n_airports}")
    rng = random.Random(f"memlayers.airports/{config.seed}")
    airports = sorted(rng.sample(everyone, config.n_airports), key=lambda a: a["name"])
    splits = {name: [airports[i] for i in indices]
              for name, indices in split_indices(len(airports), config.seen_fraction, rng).items()}
    documents = [_description(a, rng) for a in airports for _ in range(config.docs_per_airport)]
    documents += [qa_text(qa["question"], qa["answer"]) for a in splits["seen"] for qa in _qa(a)]
    rng.shuffle(documents)
    out = Path(out_dir)
    split_of = {a["name"]: name for name, group in splits.items() for a in group}
    paths = {
        "airports": write_jsonl(out / "airports.jsonl", [{**a, "split": split_of[a["name"]]} for a in airports]),
        "train": write_jsonl(out / "train.jsonl", [{"text": doc} for doc in documents]),
    }
    for split in SPLITS:
        paths[f"qa_{split}"] = write_jsonl(out / f"qa_{split}.jsonl", [qa for a in splits[split] for qa in _qa(a)])
    return paths
