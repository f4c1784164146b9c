"""A synthetic world of people with attributes, written as biographies and QA pairs.

Each person has a unique full name and five attributes (birth date, birth
city, university, field of study, employer) drawn independently and
uniformly, so a model can only know them by memorising them (the setting of
Allen-Zhu & Li's bioS data and of the factual-QA motivation of *Memory Layers
at Scale*). The training text holds ``bios_per_person`` independently
paraphrased biographies per person, each with its sentences in a fresh order.

People fall into three disjoint splits. For the *seen* people
(``seen_fraction``) every question/answer pair is also a training document:
answering them measures **recall**. The facts of the others appear only in
their biographies; their questions, never trained on, measure **extraction**
(knowledge used in a form it was not seen in), half of them for validation
(tuning) and half for test (reporting). This is the "mixed training" of
Allen-Zhu & Li's *Physics of Language Models 3.1*, where extraction becomes
learnable once biographies are varied and QA of other people shows the
format. A held-out file holds one fresh paraphrase for some people, for
perplexity. The world is a pure function of its config.
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from memlayers.config import check
from memlayers.data.text import qa_text, write_jsonl

# Value lists: plain ASCII, real-sounding, no duplicates within a list.
# fmt: off

FIRST_NAMES = (
    "Aaron", "Abigail", "Adam", "Adrian", "Agnes", "Alan", "Albert", "Alice", "Alma", "Amanda",
    "Amelia", "Andrew", "Angela", "Anna", "Anthony", "Arthur", "Audrey", "Barbara", "Beatrice",
    "Benjamin", "Bernard", "Beth", "Brandon", "Brian", "Bruce", "Caleb", "Camille", "Carl",
    "Caroline", "Catherine", "Cecilia", "Charles", "Charlotte", "Christopher", "Claire", "Clara",
    "Colin", "Daniel", "Daphne", "David", "Deborah", "Dennis", "Diana", "Dominic", "Donald",
    "Dorothy", "Douglas", "Edgar", "Edith", "Edward", "Eleanor", "Elias", "Elizabeth", "Ellen",
    "Emily", "Emma", "Eric", "Esther", "Ethan", "Eugene", "Evelyn", "Felix", "Fiona", "Frances",
    "Francis", "Frank", "Gabriel", "Gemma", "George", "Gerald", "Gloria", "Gordon", "Grace",
    "Gregory", "Hannah", "Harold", "Harriet", "Helen", "Henry", "Hugo", "Ian", "Irene", "Isaac",
    "Isabel", "Ivan", "Jacob", "James", "Janet", "Jasper", "Jean", "Jeremy", "Joan", "Joel",
    "John", "Jonathan", "Joseph", "Joyce", "Julia", "Julian", "Karen", "Keith", "Laura",
    "Lawrence", "Leo", "Leonard", "Lillian", "Linda", "Lucas", "Lucy", "Lydia", "Malcolm",
    "Margaret", "Maria", "Marion", "Martin", "Matthew", "Maurice", "Megan", "Miriam", "Nathan",
    "Nora", "Oliver", "Olivia", "Oscar", "Pamela", "Patrick", "Paul", "Pauline", "Peter", "Philip",
    "Rachel", "Raymond", "Rebecca", "Richard", "Robert", "Rosa", "Ruth", "Samuel", "Sarah",
    "Simon", "Sophia", "Stella", "Stephen", "Susan", "Theodore", "Thomas", "Timothy", "Victor",
    "Vivian", "Walter",
)

LAST_NAMES = (
    "Abbott", "Adams", "Aldridge", "Allen", "Anderson", "Archer", "Atkinson", "Bailey", "Baker",
    "Barnes", "Barrett", "Bates", "Beck", "Bell", "Bennett", "Bishop", "Blackwell", "Booth",
    "Bradley", "Brennan", "Brooks", "Burke", "Burton", "Calloway", "Campbell", "Carlson", "Carter",
    "Chambers", "Chandler", "Chapman", "Clarke", "Coleman", "Collins", "Conway", "Cooper",
    "Crawford", "Cross", "Cunningham", "Dalton", "Daniels", "Davenport", "Dawson", "Delaney",
    "Dixon", "Donovan", "Doyle", "Drake", "Duncan", "Dunn", "Eaton", "Ellis", "Emerson", "Evans",
    "Fairbanks", "Farrell", "Fenwick", "Fischer", "Fleming", "Fletcher", "Ford", "Foster",
    "Fowler", "Franklin", "Fraser", "Gallagher", "Garner", "Gibson", "Gilbert", "Goodwin",
    "Graham", "Grant", "Griffin", "Hale", "Hamilton", "Harding", "Harper", "Hartley", "Hawkins",
    "Hayes", "Henderson", "Holland", "Holmes", "Hopkins", "Howard", "Hughes", "Hunter", "Ingram",
    "Jacobs", "Jennings", "Jensen", "Keller", "Kendall", "Kennedy", "Kerr", "Kimball", "Kingsley",
    "Knight", "Lambert", "Lancaster", "Lawson", "Lindqvist", "Lloyd", "Lowell", "Lucero", "Lynch",
    "Maddox", "Marsh", "Matthews", "Maxwell", "McAllister", "Mercer", "Merritt", "Monroe",
    "Montgomery", "Morales", "Morrison", "Murphy", "Nakamura", "Navarro", "Nielsen", "Norris",
    "Novak", "Oakley", "Olsen", "Osborne", "Owens", "Palmer", "Parker", "Patel", "Pearson",
    "Pemberton", "Perkins", "Porter", "Prescott", "Quinn", "Ramsey", "Randall", "Reed", "Reeves",
    "Reynolds", "Richter", "Riley", "Rivera", "Robinson", "Rowe", "Russell", "Sanders", "Santos",
    "Sawyer", "Schneider", "Schultz", "Shaw", "Sheridan", "Simmons", "Sinclair", "Slater",
    "Spencer", "Stafford", "Stanton", "Sterling", "Stevens", "Stone", "Sullivan", "Sutton",
    "Tanaka", "Thornton", "Townsend", "Tucker", "Turner", "Underwood", "Vance", "Vaughn", "Vogel",
    "Wagner", "Walsh", "Warren", "Watkins", "Weaver", "Webster", "Wells", "Whitaker", "Whitfield",
    "Wilcox", "Willis", "Winslow", "Wolfe", "Woodward", "Wright", "Yates", "Young", "Zeller",
    "Ziegler", "Abernathy", "Bancroft", "Castellano", "Draper", "Eriksen", "Falkner", "Hargrove",
    "Ivanov",
)

CITIES = (
    "Aberdeen", "Adelaide", "Albuquerque", "Amsterdam", "Anchorage", "Antwerp", "Athens",
    "Atlanta", "Auckland", "Austin", "Baltimore", "Bangkok", "Barcelona", "Belfast", "Bergen",
    "Berlin", "Bilbao", "Birmingham", "Bologna", "Bordeaux", "Boston", "Bremen", "Brisbane",
    "Bristol", "Brno", "Brussels", "Budapest", "Buenos Aires", "Buffalo", "Cairo", "Calgary",
    "Cape Town", "Cardiff", "Charleston", "Chicago", "Cincinnati", "Cleveland", "Cologne",
    "Copenhagen", "Cork", "Dallas", "Denver", "Detroit", "Dresden", "Dublin", "Dundee",
    "Edinburgh", "Edmonton", "Florence", "Frankfurt", "Galway", "Geneva", "Genoa", "Ghent",
    "Glasgow", "Gothenburg", "Graz", "Halifax", "Hamburg", "Hanover", "Helsinki", "Honolulu",
    "Houston", "Indianapolis", "Innsbruck", "Istanbul", "Kansas City", "Krakow", "Leeds",
    "Leipzig", "Lille", "Lima", "Lisbon", "Liverpool", "Ljubljana", "London", "Los Angeles",
    "Louisville", "Lyon", "Madrid", "Malmo", "Manchester", "Marseille", "Melbourne", "Memphis",
    "Milan", "Milwaukee", "Minneapolis", "Montreal", "Munich", "Nantes", "Naples", "Nashville",
    "New Orleans", "Newcastle", "Nice", "Norfolk", "Nottingham", "Oakland", "Omaha", "Osaka",
    "Oslo", "Ottawa", "Oxford", "Palermo", "Paris", "Perth", "Philadelphia", "Phoenix",
    "Pittsburgh", "Portland", "Porto", "Prague", "Quebec City", "Reykjavik", "Richmond", "Riga",
    "Rome", "Rotterdam", "Sacramento", "Salt Lake City", "Salzburg", "San Antonio", "San Diego",
    "San Francisco", "Santiago", "Savannah", "Seattle", "Seville", "Sheffield", "Singapore",
    "Sofia", "Southampton", "Stockholm", "Strasbourg", "Stuttgart", "Sydney", "Tallinn", "Tampa",
    "Toronto", "Toulouse", "Trieste", "Tucson", "Turin", "Utrecht", "Valencia", "Vancouver",
    "Venice", "Verona", "Vienna", "Vilnius", "Warsaw", "Wellington", "Winnipeg", "Wroclaw", "York",
    "Zagreb", "Zaragoza", "Zurich", "Kyoto",
)

UNIVERSITIES = (
    "Harvard University", "Yale University", "Princeton University", "Stanford University",
    "Columbia University", "Cornell University", "Brown University", "Duke University",
    "Rice University", "Emory University", "Tufts University", "Vanderbilt University",
    "Northwestern University", "Georgetown University", "Boston University", "New York University",
    "Johns Hopkins University", "Carnegie Mellon University", "Dartmouth College",
    "Williams College", "Amherst College", "Swarthmore College", "Oberlin College",
    "Bowdoin College", "Wellesley College", "the University of Chicago",
    "the University of Michigan", "the University of Virginia", "the University of Texas",
    "the University of Washington", "the University of Wisconsin", "the University of Minnesota",
    "the University of Oregon", "the University of Arizona", "the University of Colorado",
    "the University of Utah", "the University of Toronto", "McGill University",
    "the University of British Columbia", "Queen's University", "the University of Oxford",
    "the University of Cambridge", "Imperial College London", "the University of Edinburgh",
    "the University of Glasgow", "the University of Manchester", "the University of Bristol",
    "Durham University", "Trinity College Dublin", "the University of Melbourne",
    "the University of Sydney", "the University of Auckland", "Heidelberg University",
    "the University of Vienna", "Uppsala University", "Lund University",
    "the University of Copenhagen", "Leiden University", "the University of Bologna",
    "the University of Zurich", "the University of Geneva", "Ohio State University",
    "Penn State University", "Purdue University", "Indiana University", "Rutgers University",
    "Tulane University", "Syracuse University", "Baylor University", "Clemson University",
    "Auburn University", "Iowa State University", "Kansas State University",
    "Oregon State University", "the Massachusetts Institute of Technology",
    "the California Institute of Technology", "the Georgia Institute of Technology",
    "the University of Pennsylvania", "the Sorbonne", "the University of Helsinki",
)

FIELDS = (
    "mathematics", "physics", "chemistry", "biology", "astronomy", "geology", "computer science",
    "statistics", "economics", "psychology", "sociology", "anthropology", "philosophy", "history",
    "linguistics", "political science", "law", "medicine", "nursing", "pharmacology",
    "architecture", "civil engineering", "mechanical engineering", "electrical engineering",
    "chemical engineering", "aerospace engineering", "materials science", "neuroscience",
    "biochemistry", "genetics", "ecology", "oceanography", "meteorology", "agriculture", "music",
    "fine arts", "art history", "classics", "comparative literature", "English literature",
    "journalism", "education", "accounting", "finance", "marketing", "business administration",
    "public health", "urban planning", "theology", "archaeology", "veterinary science",
    "marine biology", "industrial design", "film studies",
)

EMPLOYERS = (
    "Northwind Systems", "Bluewater Analytics", "Crestline Insurance", "Granite Peak Capital",
    "Harborview Logistics", "Ironwood Manufacturing", "Juniper Health", "Keystone Energy",
    "Lakeshore Foods", "Meridian Pharmaceuticals", "Northstar Airlines", "Oakridge Software",
    "Pinecrest Bank", "Quarry Hill Construction", "Redwood Media", "Silverline Rail",
    "Summit Biotech", "Tidewater Shipping", "Union Steel Works", "Vantage Telecom",
    "Westfield Motors", "Yellowstone Outfitters", "Anchor Point Publishing",
    "Beacon Hill Consulting", "Cedar Valley Farms", "Driftwood Hotels", "Evergreen Paper",
    "Falcon Aerospace", "Glacier Water Company", "Highland Textiles", "Indigo Chemicals",
    "Jetstream Electronics", "Kingfisher Retail", "Lighthouse Robotics", "Maplewood Furniture",
    "Nimbus Cloud Services", "Orion Instruments", "Prairie Wind Power", "Quicksilver Mining",
    "Riverbend Brewing", "Sandstone Architects", "Thunderbird Games", "Upland Dairy", "Vireo Labs",
    "Willow Creek Pharmacy", "Atlas Freight", "Brightwater Solar", "Cobalt Semiconductors",
    "Delta Marine Engineering", "Eastgate Properties", "Foxglove Cosmetics", "Goldleaf Tobacco",
    "Hawthorne Medical Devices", "Ivory Tower Books", "Jadestone Jewelers", "Kestrel Security",
    "Longview Investments", "Millbrook Glassworks", "Newport Yacht Builders", "Old Mill Bakery",
    "Pioneer Seed Company", "Queensbridge Tools", "Rockport Cement", "Starling Radio",
    "Tamarack Timber", "Unity Mutual Life", "Valley Forge Ironworks", "Whitestone Pottery",
    "Zephyr Bicycles", "Amberfield Wines", "Blackbird Studios", "Coral Bay Resorts",
    "Dovetail Software", "Emberlight Candles", "Fairhaven Hospital", "Greystone Law Partners",
    "Heron Optics", "Ironclad Batteries", "Jasper Rail Cars", "Kelvin Refrigeration",
    "Larkspur Gardens", "Mariner Fisheries", "Noble Gas Works", "Osprey Drones",
    "Paragon Plastics", "Quill and Ink Stationers", "Rosewood Pianos", "Sterling Silversmiths",
    "Trident Pumps", "Ulysses Travel", "Verdant Fertilizers", "Wakefield Mills",
    "Yarrow Tea Company", "Alder Street Capital", "Bridgeport Chemicals", "Cascade Turbines",
    "Dunmore Ceramics", "Everett Lumber", "Foundry Row Metals", "Gilded Age Antiques",
    "Hollow Oak Distillery", "Inland Empire Trucking", "Juno Satellite Systems",
    "Knotty Pine Cabins", "Lodestar Navigation", "Monarch Elevators", "Nightingale Nursing Homes",
    "Overland Tire Company", "Pelican Canning", "Radiant Lighting", "Saltmarsh Seafood",
    "Timberline Skis", "Umbra Eyewear", "Vesper Perfumes", "Windmill Grain Company",
)

# fmt: on

SPLITS = ("seen", "validation", "test")
"""The people's splits: QA trained on (recall), and unseen QA for tuning and for reporting (extraction)."""

ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer")
"""The five attributes of every person, in the order of ``qa_pairs()`` and ``people.jsonl``."""

BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "The birth date of {name} is {value}.",
        "{name}'s date of birth is {value}.",
        "{name} entered life on {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} is a native of {value}.",
        "The birthplace of {name} is {value}.",
        "{name} came into the world in {value}.",
        "{name} was born in the city of {value}.",
    ),
    "university": (
        "{name} attended {value}.",
        "{name} graduated from {value}.",
        "{name} received an education at {value}.",
        "{name} is a graduate of {value}.",
        "The alma mater of {name} is {value}.",
    ),
    "field": (
        "{name} studied {value}.",
        "{name} majored in {value}.",
        "{name} completed a degree in {value}.",
        "The field of study of {name} was {value}.",
        "{name} focused on {value} at university.",
    ),
    "employer": (
        "{name} worked for {value}.",
        "{name} was employed by {value}.",
        "{name} held a job at {value}.",
        "The employer of {name} was {value}.",
        "{name} built a career at {value}.",
    ),
}
"""Paraphrases of each attribute's sentence; every one states the full name and the exact value."""

QUESTION_TEMPLATES: dict[str, str] = {
    "birth_date": "When was {name} born?",
    "birth_city": "In which city was {name} born?",
    "university": "Which university did {name} attend?",
    "field": "What did {name} study?",
    "employer": "Which company did {name} work for?",
}
"""The one question per attribute; its answer is the attribute value."""

PARAPHRASED_QUESTIONS: dict[str, str] = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "Where was {name} born?",
    "university": "Where did {name} go to university?",
    "field": "What was the field of study of {name}?",
    "employer": "Who employed {name}?",
}
"""A second wording of each question, never in training text: whether a fact learned as one
question/answer pair is also known when asked another way."""


@dataclass
class FactWorldConfig:
    """Size and seed of a synthetic fact world (see :func:`generate_world`)."""

    n_people: int = 4000
    """Number of people, each with a unique full name."""
    seed: int = 0
    """The world (people, paraphrases, document order) is a pure function of the config."""
    bios_per_person: int = 2
    """Independently paraphrased biographies per person in the training text."""
    seen_fraction: float = 0.5
    """Fraction of the people whose question/answer pairs (``qa_text``) are also training
    documents (recall); the questions of the rest are the validation and test splits (extraction)."""
    heldout_people: int = 200
    """People with one extra, freshly paraphrased biography in the held-out file."""

    def __post_init__(self) -> None:
        max_people = len(FIRST_NAMES) * len(LAST_NAMES)
        check(self.n_people >= 1, "n_people", f"must be >= 1, got {self.n_people}")
        check(
            self.n_people <= max_people,
            "n_people",
            f"must be <= {max_people} (the number of distinct first-last name pairs), got {self.n_people}",
        )
        check(
            1 <= self.bios_per_person <= 1000,
            "bios_per_person",
            f"must be in [1, 1000] (each is a distinct phrasing of the same facts), got {self.bios_per_person}",
        )
        check(
            0.0 <= self.seen_fraction <= 1.0,
            "seen_fraction",
            f"must be in [0, 1] (the fraction of people whose QA pairs are trained on), got {self.seen_fraction}",
        )
        check(
            self.heldout_people >= 0, "heldout_people", f"must be >= 0, got {self.heldout_people}"
        )
        check(
            self.heldout_people <= self.n_people,
            "heldout_people",
            f"must be <= n_people ({self.n_people}), got {self.heldout_people}",
        )


@dataclass(frozen=True)
class Person:
    """A person of the world: a unique full name and attribute -> value (all strings)."""

    name: str
    attributes: dict[str, str]

    def sentence(self, attribute: str, template: int) -> str:
        """The biography sentence for ``attribute`` written with paraphrase number ``template``."""
        return BIO_TEMPLATES[attribute][template].format(
            name=self.name, value=self.attributes[attribute]
        )

    def biography(self, rng: random.Random) -> str:
        """The five attribute sentences in a random order, each with a random paraphrase."""
        order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
        return " ".join(self.sentence(a, rng.randrange(len(BIO_TEMPLATES[a]))) for a in order)

    def question(self, attribute: str, paraphrased: bool = False) -> str:
        """The question whose answer is this person's ``attribute`` (or its second wording)."""
        return (PARAPHRASED_QUESTIONS if paraphrased else QUESTION_TEMPLATES)[attribute].format(name=self.name)


def split_indices(n: int, seen_fraction: float, rng: random.Random) -> dict[str, list[int]]:
    """Indices ``0..n-1`` drawn into :data:`SPLITS` (each sorted): ``round(seen_fraction * n)``
    seen, the rest halved into validation and test (test takes the odd one)."""
    order = list(range(n))
    rng.shuffle(order)
    n_seen = round(seen_fraction * n)
    unseen = order[n_seen:]
    chosen = {"seen": order[:n_seen], "validation": unseen[: len(unseen) // 2], "test": unseen[len(unseen) // 2 :]}
    return {name: sorted(indices) for name, indices in chosen.items()}


def _rng(config: FactWorldConfig, stream: str) -> random.Random:
    """An independent, reproducible random stream (string seeds do not depend on PYTHONHASHSEED)."""
    return random.Random(f"memlayers.facts/{config.seed}/{stream}")


def _birth_date(rng: random.Random) -> str:
    """A uniformly random date of the years 1900-1999, e.g. "March 4, 1962"."""
    year = rng.randint(1900, 1999)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return f"{calendar.month_name[month]} {day}, {year}"


@dataclass
class FactWorld:
    """People with attributes, and the documents and QA pairs written about them.

    Every method is deterministic: calling it twice gives the same result.
    """

    config: FactWorldConfig
    people: list[Person]

    def biographies(self) -> list[str]:
        """The training biographies, person-major: ``bios_per_person`` consecutive ones per person."""
        rng = _rng(self.config, "bios")
        return [p.biography(rng) for p in self.people for _ in range(self.config.bios_per_person)]

    def splits(self) -> dict[str, list[Person]]:
        """The people of each split (:data:`SPLITS`), each in world order; disjoint, together all people.

        ``round(seen_fraction * n_people)`` people are seen; the unseen rest is
        halved into validation and test (test takes the odd one).
        """
        chosen = split_indices(len(self.people), self.config.seen_fraction, _rng(self.config, "splits"))
        return {name: [self.people[i] for i in indices] for name, indices in chosen.items()}

    def qa_pairs(self, split: str | None = None, paraphrased: bool = False) -> list[dict[str, str]]:
        """One ``{"question", "answer", "person", "attribute"}`` per person and attribute, person-major:
        of every person, or of the people of ``split`` (one of :data:`SPLITS`); ``paraphrased``
        asks with :data:`PARAPHRASED_QUESTIONS`."""
        people = self.people if split is None else self.splits()[split]
        return [
            {"question": p.question(a, paraphrased), "answer": p.attributes[a], "person": p.name, "attribute": a}
            for p in people
            for a in ATTRIBUTES
        ]

    def training_documents(self) -> list[str]:
        """All biographies plus every ``qa_text(question, answer)`` of the seen people, shuffled by the seed."""
        documents = self.biographies()
        documents += [qa_text(qa["question"], qa["answer"]) for qa in self.qa_pairs("seen")]
        _rng(self.config, "order").shuffle(documents)
        return documents

    def _heldout(self) -> list[tuple[Person, str]]:
        """``(person, biography)`` for the held-out people, in world order.

        Each held-out biography differs from that person's training biographies.
        """
        k = self.config.bios_per_person
        training = self.biographies()
        rng = _rng(self.config, "heldout")
        chosen = sorted(rng.sample(range(len(self.people)), self.config.heldout_people))
        heldout = []
        for index in chosen:
            person, seen = self.people[index], set(training[index * k : (index + 1) * k])
            for _ in range(100):  # 5! orders x 5^5 paraphrases: the first try almost always differs
                bio = person.biography(rng)
                if bio not in seen:
                    break
            heldout.append((person, bio))
        return heldout

    def heldout_documents(self) -> list[str]:
        """One fresh biography for each of ``heldout_people`` randomly chosen people (for perplexity)."""
        return [bio for _, bio in self._heldout()]

    def heldout_names(self) -> list[str]:
        """The names of the people of :meth:`heldout_documents`, in the same order."""
        return [person.name for person, _ in self._heldout()]


def generate_world(config: FactWorldConfig, exclude: Collection[str] = ()) -> FactWorld:
    """Draw ``config.n_people`` people with unique names and independent uniform attributes;
    none is named as one in ``exclude`` (the people of another world: new facts to learn)."""
    rng = _rng(config, "people")
    n_last = len(LAST_NAMES)
    # distinct (first, last) pairs -> unique names
    names: Sequence[int] = range(len(FIRST_NAMES) * n_last)
    if exclude:
        excluded = set(exclude)
        names = [i for i in names if f"{FIRST_NAMES[i // n_last]} {LAST_NAMES[i % n_last]}" not in excluded]
        check(config.n_people <= len(names), "n_people",
              f"must be <= {len(names)} (the names left after excluding {len(excluded)}), got {config.n_people}")
    pairs = rng.sample(names, config.n_people)
    people = []
    for pair in pairs:
        attributes = {
            "birth_date": _birth_date(rng),
            "birth_city": rng.choice(CITIES),
            "university": rng.choice(UNIVERSITIES),
            "field": rng.choice(FIELDS),
            "employer": rng.choice(EMPLOYERS),
        }
        people.append(
            Person(f"{FIRST_NAMES[pair // n_last]} {LAST_NAMES[pair % n_last]}", attributes)
        )
    return FactWorld(config, people)


def write_world(world: FactWorld, out_dir: str | Path) -> dict[str, Path]:
    """Write the world as JSON Lines files in ``out_dir`` (created if needed), each atomically.

    Returns :func:`world_paths`: ``people.jsonl`` (``{"name", "split",
    <attribute>: value, ...}``), ``train.jsonl`` (``{"text"}`` per training
    document), ``qa.jsonl`` (every pair), ``qa_seen.jsonl``, ``qa_validation.jsonl`` and ``qa_test.jsonl``
    (``{"question", "answer", "person", "attribute"}`` of each split; empty
    when the split has no people) and ``heldout.jsonl`` (``{"text"}``; empty
    when ``heldout_people`` is 0).
    """
    split_of = {p.name: name for name, people in world.splits().items() for p in people}
    records = {
        "people": [
            {"name": p.name, "split": split_of[p.name], **{a: p.attributes[a] for a in ATTRIBUTES}}
            for p in world.people
        ],
        "train": [{"text": doc} for doc in world.training_documents()],
        "qa": world.qa_pairs(),
        **{f"qa_{split}": world.qa_pairs(split) for split in SPLITS},
        "heldout": [{"text": doc} for doc in world.heldout_documents()],
    }
    paths = world_paths(out_dir)
    return {name: write_jsonl(paths[name], rows) for name, rows in records.items()}


def world_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where :func:`write_world` puts each file of a world in ``out_dir``."""
    names = ("people", "train", "qa", *(f"qa_{split}" for split in SPLITS), "heldout")
    return {name: Path(out_dir) / f"{name}.jsonl" for name in names}
