"""Two tasks from the English conversations of the pip package ``chatterbot-corpus``:

- ``chatterbot-qa``: consecutive (question, answer) turns. Test: 20%, grouped by question.
- ``chatterbot-chat``: the conversations whole, as chat rows (``{"messages": [...]}``, turns
  alternating user / assistant, multi-turn where the corpus has them). Test: 20%, grouped by
  first user turn.
"""

from __future__ import annotations

import io

import yaml

from petkit.data.embedded import register_task
from petkit.data.embedded._text import read_text
from petkit.data.task import Task, holdout_split
from petkit.models.packages import EmbeddedPackage, package_file

CHATTERBOT_CORPUS = EmbeddedPackage("chatterbot-corpus", "chatterbot_corpus", "1.3.3")
CHATTERBOT_DIR = "data/english"


def _conversations(task: str) -> list[list[str]]:
    """Every English chatterbot-corpus conversation as its list of stripped turns."""
    root = package_file(CHATTERBOT_CORPUS, CHATTERBOT_DIR, f"embedded task {task!r}")
    out = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(io.StringIO(read_text(path))) or {}
        for conversation in data.get("conversations") or []:
            if isinstance(conversation, list):
                out.append([str(t).strip() for t in conversation])
    return out


def load_chat(test_fraction: float, seed: int) -> Task:
    """Whole conversations, each ending on an answer; duplicates dropped."""
    seen: set[tuple[str, ...]] = set()
    examples: list[dict] = []
    for turns in _conversations("chatterbot-chat"):
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


def load_qa(test_fraction: float, seed: int) -> Task:
    """Each (turn, next turn) pair once."""
    seen: set[tuple[str, str]] = set()
    examples: list[dict] = []
    for turns in _conversations("chatterbot-qa"):
        for prompt, completion in zip(turns, turns[1:]):
            if prompt and completion and (prompt, completion) not in seen:
                seen.add((prompt, completion))
                examples.append({"prompt": prompt, "completion": completion})
    train, test = holdout_split(examples, round(test_fraction * len(examples)), seed)
    return Task(name="chatterbot-qa", kind="instruction", train=train, test=test)


register_task("chatterbot-qa", "English question/answer turns from chatterbot-corpus", load_qa,
              kind="instruction", package=CHATTERBOT_CORPUS)
register_task("chatterbot-chat", "English chatterbot-corpus conversations as multi-turn chats",
              load_chat, kind="chat", package=CHATTERBOT_CORPUS)
