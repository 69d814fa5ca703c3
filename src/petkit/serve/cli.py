"""`petkit generate` and `petkit chat`: talk to a base and its adapters in the terminal.

    petkit generate --adapter runs/default/adapter --prompt "Is this film good?"
    petkit generate --model smollm2-135m --adapter a=runs/a/adapter --adapter b=runs/b/adapter \\
                    --prompts-file questions.txt --compare --max-new-tokens 64
    petkit chat --adapter runs/default/adapter --compare        # stdin lines; /reset, /exit

Every answer comes from the serving engine (serve/engine.py): the base and all adapters answer
each prompt together in one batch, and the first answer streams as it is produced. The prompt goes
through the tokenizer's chat template (`--raw` sends it as plain text). The base is `--model`, or
else what the first adapter records (`base_model` in adapter.json, else its run's recipe.yaml).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from typing import TYPE_CHECKING

from petkit.core.errors import ConfigError

if TYPE_CHECKING:  # torch and the model load only when a command runs (`petkit --help` stays light)
    from petkit.serve.engine import Engine, GenerationRequest, Handle

BASE = "base"


def add_arguments(parser: argparse.ArgumentParser, chat: bool) -> None:
    """The flags of `petkit chat` (chat=True) or `petkit generate`."""
    parser.add_argument("--model", default=None,
                        help="base model: embedded name, local folder or hub id (default: the adapter's base)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                        help="adapter folder to answer with (repeatable; NAME defaults to the folder's name)")
    parser.add_argument("--compare", action="store_true", help="also answer with the base, labelled, for comparison")
    if not chat:
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--prompt", help="the prompt to answer")
        source.add_argument("--prompts-file", metavar="FILE", help="answer each line of FILE")
    parser.add_argument("--system", default=None, help="a system message before the prompt")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text (no chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per answer (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same answer)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:1, ... or auto (runtime.device; default cpu)")


def command(args: argparse.Namespace, dotted: dict[str, str], chat: bool, out: TextIO | None = None,
            inp: TextIO | None = None) -> None:
    """Run `petkit chat` (chat=True: stdin lines) or `petkit generate`. `dotted`: the
    --model.F / --runtime.F options (app.serving reads model.quantize and runtime.device)."""
    out = out or sys.stdout
    adapters = parse_adapters(args.adapter)
    engine = load_engine(base_recipe(args.model, adapters, args, dotted,
                                     "chat" if chat else "generate"), adapters)
    names: list[str | None] = list(adapters) or [None]
    if args.compare and adapters:
        names.insert(0, None)
    talk = Talk(engine, names, args, out)
    engine.start()
    try:
        if chat:
            talk.chat(inp or sys.stdin)
        else:
            talk.prompts([args.prompt] if args.prompt is not None else read_prompts(args.prompts_file))
    finally:
        engine.stop()


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """{name: folder} from --adapter PATH or NAME=PATH entries."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = Path(spec).name or "adapter", spec
        folder = Path(path).expanduser()
        if not (folder / "adapter.json").is_file():
            raise ConfigError(f"--adapter {spec}: {folder} is not an adapter folder (no adapter.json)")
        if name in out or name == BASE:
            raise ConfigError(f"--adapter {spec}: the name {name!r} is taken; give it another with NAME=PATH")
        out[name] = folder
    return out


def base_of(adapter: Path | None) -> str:
    """The base an adapter was trained on: adapter.json's base_model, else its run's recipe."""
    if adapter is None:
        raise ConfigError("give --model (a base to talk to) or --adapter (an adapter folder)")
    from petkit.core.io import read_adapter

    meta, _ = read_adapter(adapter)
    if meta.get("base_model"):
        return str(meta["base_model"])
    recipe = adapter.parent / "recipe.yaml"
    if recipe.is_file():
        from petkit.app.recipe import load_recipe

        return load_recipe(recipe).model.name
    raise ConfigError(f"--adapter {adapter}: it records no base model and has no run recipe beside it; "
                      "give the base with --model")


def base_recipe(model: str | None, adapters: dict[str, Path], args: argparse.Namespace,
                dotted: dict[str, str], command: str) -> Any:
    """The serving recipe (app.serving): base `model` (--model), else the first adapter's (its
    name by `base_of`, its run's model.quantize); --device as runtime.device, then `dotted`."""
    from petkit.app.serving import serving_recipe  # torch: only once a command runs

    first = next(iter(adapters.values()), None)
    return serving_recipe(model or base_of(first), {"runtime.device": args.device, **dotted},
                          command, adapter=None if model else first)


def load_engine(recipe: Any, adapters: dict[str, Path], **settings: int | bool) -> Engine:
    """An engine over the recipe's base (loaded by the pipeline, app.serving) and `adapters`."""
    from petkit.app.serving import serving_base
    from petkit.serve.engine import Engine

    model, tokenizer = serving_base(recipe)
    settings = {"max_batch": 16, "max_adapters": max(1, len(adapters)), **settings}
    engine = Engine(model, tokenizer, **settings)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def read_prompts(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--prompts-file {path}: no such file")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"--prompts-file {path} holds no prompt (one per line)")
    return lines


class Talk:
    """Prompts to answers: one request per answering model, submitted together, printed labelled."""

    def __init__(self, engine: Engine, names: list[str | None], args: argparse.Namespace, out: TextIO) -> None:
        self.engine, self.names, self.args, self.out = engine, names, args, out
        self.history: dict[str | None, list[dict[str, str]]] = {n: [] for n in names}
        if args.raw and engine.tokenizer is None:
            raise ConfigError("--raw needs a tokenizer")

    def prompts(self, prompts: list[str]) -> None:
        """Answer every prompt; up to a batch of them are submitted at once, printed in order."""
        per_batch = max(1, self.engine.max_batch // len(self.names))
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start: start + per_batch]
            handles = [[self.engine.submit(self.request(n, p)) for n in self.names] for p in chunk]
            for i, row in enumerate(handles):
                if start + i:
                    self.out.write("\n")
                for name, handle in zip(self.names, row):
                    self.show(name, handle)

    def chat(self, inp: TextIO) -> None:
        self.out.write("type a message; /reset forgets the conversation, /exit ends\n")
        ask = (lambda: self.out.write("> ") or self.out.flush()) if inp.isatty() else (lambda: None)
        for line in _lines(inp, ask):
            text = line.strip()
            if text == "/exit":
                break
            if text == "/reset":
                self.history = {n: [] for n in self.names}
                self.out.write("(conversation reset)\n")
            elif text:
                self.answer(text, remember=True)

    def answer(self, prompt: str, remember: bool) -> None:
        handles = [self.engine.submit(self.request(name, prompt)) for name in self.names]
        for name, handle in zip(self.names, handles):
            self.show(name, handle)
            if remember:
                self.history[name] += [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": handle.text}]

    def request(self, name: str | None, prompt: str) -> GenerationRequest:
        a = self.args
        if a.raw:
            source: dict[str, Any] = {"prompt": prompt}
        else:
            system = [{"role": "system", "content": a.system}] if a.system else []
            source = {"messages": system + self.history[name] + [{"role": "user", "content": prompt}]}
        from petkit.serve.engine import GenerationRequest

        return GenerationRequest(**source, adapter=name, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                 top_p=a.top_p, seed=a.seed, stop=list(a.stop))

    def show(self, name: str | None, handle: Handle) -> None:
        if len(self.names) > 1:
            self.out.write(f"[{name or BASE}] ")
        for piece in handle:
            self.out.write(piece)
            self.out.flush()
        if handle.finish_reason == "error":
            raise ConfigError(f"generation failed: {handle.error}")
        self.out.write("\n")
        self.out.flush()


def _lines(inp: TextIO, prompt: Callable[[], Any]) -> Iterable[str]:
    while True:
        prompt()
        line = inp.readline()
        if not line:
            return
        yield line
