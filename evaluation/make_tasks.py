"""Build the offline evaluation tasks' data from the bundled held-out corpus split.

The tasks must run without the network and be scoreable above chance by a tiny model trained on the
same kind of text, so they are built from real held-out sentences (never seen in training) with
distractors drawn from the same text. Everything is seeded: running this again rewrites identical
files, which are committed next to their YAML in `evaluation/tasks/`.

    python -m squeeze.evaluation.make_tasks
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from squeeze.data import corpus_text

TASKS_DIR = Path(__file__).parent / "tasks"
SEED = 1234
PER_TASK = 200
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def sentences(text: str) -> list[list[str]]:
    """Per chapter (paragraph), its sentences; short fragments are merged into the next sentence."""
    chapters = []
    for para in text.split("\n\n"):
        out: list[str] = []
        carry = ""
        for s in _SENTENCE_END.split(para.strip()):
            s = (carry + " " + s).strip() if carry else s.strip()
            if len(s.split()) < 6:
                carry = s
                continue
            out.append(s)
            carry = ""
        if len(out) >= 3:
            chapters.append(out)
    return chapters


def cloze_docs(chapters: list[list[str]], vocab: list[str], rng: random.Random) -> list[dict]:
    """Next-word cloze: the previous sentence and a sentence prefix; pick the true next word of 4."""
    docs = []
    for ch in chapters:
        for prev, sent in zip(ch, ch[1:], strict=False):
            words = sent.split()
            spots = [i for i in range(4, len(words)) if _WORD.match(words[i])]
            if not spots:
                continue
            i = rng.choice(spots)
            answer = words[i]
            distractors = rng.sample([w for w in vocab if w != answer], 3)
            choices = [answer, *distractors]
            rng.shuffle(choices)
            docs.append({"context": f"{prev} {' '.join(words[:i])}", "choices": choices,
                         "label": choices.index(answer)})
    return docs


def order_docs(chapters: list[list[str]], rng: random.Random) -> list[dict]:
    """Sentence order: after a context sentence, the next two sentences in their order or swapped."""
    docs = []
    for ch in chapters:
        for a, b, c in zip(ch, ch[1:], ch[2:], strict=False):
            choices = [f"{b} {c}", f"{c} {b}"]
            label = rng.randrange(2)
            if label:
                choices.reverse()
            docs.append({"context": a, "choices": choices, "label": label})
    return docs


def word_choice_docs(chapters: list[list[str]], vocab: list[str], rng: random.Random) -> list[dict]:
    """Word choice: the true sentence against three copies with one content word replaced."""
    docs = []
    for ch in chapters:
        for prev, sent in zip(ch, ch[1:], strict=False):
            words = sent.split()
            spots = [i for i in range(len(words)) if _WORD.match(words[i])]
            if len(spots) < 3:
                continue
            corrupted = []
            for i in rng.sample(spots, 3):
                w = list(words)
                w[i] = rng.choice([v for v in vocab if v != words[i]])
                corrupted.append(" ".join(w))
            choices = [sent, *corrupted]
            rng.shuffle(choices)
            docs.append({"context": prev, "choices": choices, "label": choices.index(sent)})
    return docs


def passage_docs(text: str, max_chars: int = 1200) -> list[dict]:
    """Perplexity passages: each chapter cut at sentence ends into pieces of at most `max_chars`."""
    docs = []
    for para in text.split("\n\n"):
        piece = ""
        for s in _SENTENCE_END.split(para.strip()):
            if piece and len(piece) + len(s) + 1 > max_chars:
                docs.append({"text": piece})
                piece = ""
            piece = f"{piece} {s}".strip()
        if piece:
            docs.append({"text": piece})
    return docs


def build(out: Path = TASKS_DIR) -> dict[str, int]:
    """Write every task's JSONL; returns the number of documents per file."""
    text = corpus_text("heldout")
    chapters = sentences(text)
    vocab = sorted({w for ch in chapters for s in ch for w in s.split() if _WORD.match(w)})
    made = {
        "cloze.jsonl": cloze_docs(chapters, vocab, random.Random(SEED)),
        "sentence_order.jsonl": order_docs(chapters, random.Random(SEED + 1)),
        "word_choice.jsonl": word_choice_docs(chapters, vocab, random.Random(SEED + 2)),
        "heldout_passages.jsonl": passage_docs(text),
    }
    counts = {}
    for name, docs in made.items():
        # Shuffle so that `--limit N` takes documents from across the whole split, then cap the size.
        random.Random(SEED).shuffle(docs)
        docs = docs[:PER_TASK]
        (out / name).write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        counts[name] = len(docs)
    return counts


if __name__ == "__main__":
    for name, n in build().items():
        print(f"{name}: {n} documents")
