"""Build the labelled set of the fine-tuning demo: which play does a Shakespeare passage come from?

    python -m examples.shakespeare_plays data/shakespeare data/plays

Reads four plays of the corpus that ``make data`` fetches (two tragedies, two comedies), drops
speaker names and stage directions, cuts the spoken lines into passages of a few lines and
writes ``passages.jsonl`` records ``{"text": ..., "label": <play>}``. The speaker names are
removed on purpose: with them, the play is a lookup, not a language task.

The same passages as chat records go to ``chat.jsonl`` and, every tenth, ``chat_test.jsonl``
(the chat SFT + LoRA demo, ``configs/tiny-chat-lora.yaml``): the user asks which play a passage
is from, the assistant answers with its title. ``ask`` prompts an exported model with the held-out
questions the way a user would, through ``apply_chat_template``, and scores its answers:

    python -m examples.shakespeare_plays ask runs/tiny-chat-lora/export data/plays/chat_test.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import BatchEncoding

PLAYS = {"hamlet": "hamlet_gut.txt", "macbeth": "macbeth_gut.txt", "tempest": "tempest_gut.txt",
         "twelfth_night": "twelfth_night_gut.txt"}
LINES_PER_PASSAGE = 4
TITLES = {"hamlet": "Hamlet", "macbeth": "Macbeth", "tempest": "The Tempest", "twelfth_night": "Twelfth Night"}
QUESTION = "Which play is this from?"
TEST_EVERY = 10
"""Every tenth conversation is held out in chat_test.jsonl."""
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


def chat_record(record: dict) -> dict:
    """A ``passages.jsonl`` record as a conversation: the question and the passage, then the title."""
    return {"messages": [{"role": "user", "content": f"{QUESTION}\n{record['text']}"},
                         {"role": "assistant", "content": TITLES[record["label"]]}]}


def _write_jsonl(target: Path, records: list[dict]) -> None:
    tmp = target.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(target)


def build(corpus: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for label, name in PLAYS.items():
        path = corpus / name
        if not path.exists():
            raise SystemExit(f"shakespeare_plays: {path} is missing; run `make data` first")
        records += [{"text": p, "label": label} for p in passages(spoken_lines(path.read_text()))]
    target = out / "passages.jsonl"
    _write_jsonl(target, records)
    chats = [chat_record(r) for r in records]
    _write_jsonl(out / "chat.jsonl", [c for i, c in enumerate(chats) if i % TEST_EVERY])
    _write_jsonl(out / "chat_test.jsonl", chats[::TEST_EVERY])
    counts = {k: sum(r["label"] == k for r in records) for k in PLAYS}
    print(f"shakespeare_plays: {len(records)} passages {counts} → {target} (and as chat: {out / 'chat.jsonl'})")
    return target


def ask(model_dir: Path, test_file: Path, max_new_tokens: int = 8) -> dict:
    """Prompt the chat model exported in ``model_dir`` with each held-out question of ``test_file``
    (``apply_chat_template(..., add_generation_prompt=True)``, greedy) and score its answers against
    the titles, next to always answering the most common title."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chats = [json.loads(line)["messages"] for line in test_file.read_text().splitlines()]
    answers = []
    for messages in chats:
        # return_dict=True gives a BatchEncoding: the stubs' return type is the union of every option's
        prompt = cast("BatchEncoding", tok.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                                               return_tensors="pt", return_dict=True))
        with torch.no_grad():
            out = model.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        answers.append(cast(str, tok.decode(out[0, prompt["input_ids"].shape[1]:],  # 1-D ids: decodes to a str
                                            skip_special_tokens=True)).strip())
    truth = [m[-1]["content"] for m in chats]
    majority = max(set(truth), key=truth.count)
    result = {"questions": len(chats), "accuracy": sum(a == t for a, t in zip(answers, truth)) / len(chats),
              "majority": majority, "majority_accuracy": truth.count(majority) / len(chats),
              "answers": {title: answers.count(title) for title in sorted(set(answers))}}
    print(f"shakespeare_plays ask: {result['accuracy']:.3f} of {len(chats)} held-out questions answered with "
          f"the right title (always {majority!r}: {result['majority_accuracy']:.3f}); answers given: "
          f"{result['answers']}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "ask":
        ask(Path(args[1]), Path(args[2]))
        return 0
    if len(args) != 2:
        print("usage: python -m examples.shakespeare_plays CORPUS_DIR OUT_DIR\n"
              "       python -m examples.shakespeare_plays ask MODEL_DIR CHAT_TEST_JSONL", file=sys.stderr)
        return 2
    build(Path(args[0]), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
