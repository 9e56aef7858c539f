"""Build the labelled set of the fine-tuning demo: which play does a Shakespeare passage come from?

    python -m launch.shakespeare_plays data/shakespeare data/plays

Reads four plays of the corpus that ``make data`` fetches (two tragedies, two comedies), drops
speaker names and stage directions, cuts the spoken lines into passages of a few lines and
writes ``passages.jsonl`` records ``{"text": ..., "label": <play>}``. The speaker names are
removed on purpose: with them, the play is a lookup, not a language task.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PLAYS = {"hamlet": "hamlet_gut.txt", "macbeth": "macbeth_gut.txt", "tempest": "tempest_gut.txt",
         "twelfth_night": "twelfth_night_gut.txt"}
LINES_PER_PASSAGE = 4
_SPEAKER = re.compile(r"^(?:[A-Z][A-Z .,'-]+\.?|(?:[A-Z][\w']*\.? ){0,2}[A-Z][\w']*\.)$")  # MASTER. / First Clown.
_HEADING = re.compile(r"^(ACT|SCENE|Act|Scene)\b")


def spoken_lines(text: str) -> list[str]:
    """The verse and prose that characters speak, from the first ``ACT`` on."""
    start = re.search(r"^ACT\b", text, flags=re.M | re.I)
    lines, in_direction = [], False
    for raw in text[start.start() if start else 0:].splitlines():
        line = raw.strip()
        if line.startswith("["):
            in_direction = True
        if in_direction:
            in_direction = "]" not in line
            continue
        if not line or _SPEAKER.match(line) or _HEADING.match(line):
            continue
        lines.append(re.sub(r"\[.*?\]", "", line).strip())
    return [x for x in lines if x]


def passages(lines: list[str], size: int = LINES_PER_PASSAGE) -> list[str]:
    return [" ".join(lines[i: i + size]) for i in range(0, len(lines) - size + 1, size)]


def build(corpus: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for label, name in PLAYS.items():
        path = corpus / name
        if not path.exists():
            raise SystemExit(f"shakespeare_plays: {path} is missing; run `make data` first")
        records += [{"text": p, "label": label} for p in passages(spoken_lines(path.read_text()))]
    target = out / "passages.jsonl"
    tmp = target.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(target)
    counts = {k: sum(r["label"] == k for r in records) for k in PLAYS}
    print(f"shakespeare_plays: {len(records)} passages {counts} → {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m launch.shakespeare_plays CORPUS_DIR OUT_DIR", file=sys.stderr)
        return 2
    build(Path(args[0]), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
