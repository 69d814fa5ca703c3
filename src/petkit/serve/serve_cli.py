"""`petkit serve`: an OpenAI-compatible server of one base and many adapters on this machine.

    petkit serve --model smollm2-135m --adapter support=runs/support/adapter --adapter-dir adapters/
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"model": "support", "messages": [{"role": "user", "content": "Hi"}]}'

The flags are added without importing FastAPI or uvicorn (`petkit --help` runs on the base
install); `command` checks for them and names the pip install when they are missing.
"""
from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petkit.core.errors import ConfigError
from petkit.models.packages import extra_packages, require_module
from petkit.serve.cli import base_of, base_recipe, load_engine, parse_adapters

if TYPE_CHECKING:  # the model, the engine and FastAPI load only when `petkit serve` runs
    from petkit.serve.engine import Engine
    from petkit.serve.http import ServeSettings

ADAPTER_JSON = "adapter.json"  # petkit.core.io.META, named here without importing torch

EXTRA = extra_packages("serve")
DEFAULT_MODEL = "smollm2-135m"
MODULES = ("fastapi", "uvicorn", "prometheus_client")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `petkit serve` flags."""
    parser.add_argument("--model", default=None,
                        help="base model: embedded name, local folder or hub id (default: the first "
                             f"adapter's base, else {DEFAULT_MODEL})")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the base's name in requests' \"model\" (default: --model as given)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                        help="serve the adapter folder PATH as model NAME (repeatable; NAME defaults "
                             "to the folder's name)")
    parser.add_argument("--adapter-dir", default=None, metavar="DIR",
                        help="serve every adapter folder inside DIR, each named after its folder")
    parser.add_argument("--adapter-root", default=None, metavar="DIR",
                        help="runtime loads (POST /v1/load_lora_adapter) only from folders under DIR "
                             "(default: --adapter-dir if given, else the current folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a --host that other machines can reach")
    parser.add_argument("--api-key", default=os.environ.get("PETKIT_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1/* requests (default: "
                             "$PETKIT_API_KEY, which keeps the key out of the process list)")
    parser.add_argument("--max-adapters", type=int, metavar="N", default=8,
                        help="adapters resident on the device at once, the rest on the host (LRU)")
    parser.add_argument("--max-batch", type=int, metavar="N", default=16, help="rows decoded together")
    parser.add_argument("--max-queue", type=int, metavar="N", default=64,
                        help="requests waiting for a row; more get 503 (default 64)")
    parser.add_argument("--max-tokens", type=int, metavar="N", default=1024,
                        help="the most new tokens a request may ask for (more: 400)")
    parser.add_argument("--max-body-kb", type=int, metavar="N", default=1024,
                        help="largest request body in KiB (more: 413)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:1, ... or auto (runtime.device; default cpu)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on a GPU, prefill eagerly instead of replaying captured CUDA graphs")


def adapter_folders(specs: list[str], folder: str | None) -> dict[str, Path]:
    """{name: folder} from --adapter [NAME=]PATH entries and the adapter folders inside --adapter-dir."""
    adapters = parse_adapters(specs)
    if folder is None:
        return adapters
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--adapter-dir {folder}: not a folder")
    found = sorted(p for p in root.iterdir()  # a dot name is a version or temp of a save
                   if not p.name.startswith(".") and (p / ADAPTER_JSON).is_file())
    if not found:
        raise ConfigError(f"--adapter-dir {folder} holds no adapter folder (none has {ADAPTER_JSON})")
    for path in found:
        if path.name in adapters:
            raise ConfigError(f"--adapter-dir {folder}: the adapter name {path.name!r} is given twice")
        adapters[path.name] = path
    return adapters


def base_name(args: argparse.Namespace, adapters: dict[str, Path]) -> str:
    """--model, else the base the first adapter records, else the embedded default."""
    if args.model:
        return args.model
    return base_of(next(iter(adapters.values()))) if adapters else DEFAULT_MODEL


def _check_device(name: str) -> None:
    """--device names a device this machine has (before the model loads)."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from err
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (count == 0 or (device.index or 0) >= count):
        raise ConfigError(f"--device {name}: torch sees {count} CUDA device(s) here; use --device cpu")


def _check_port(host: str, port: int) -> None:
    """A clear error now rather than uvicorn's log line after the model has loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); "
                              f"pick another --port") from err


def _settings(args: argparse.Namespace) -> ServeSettings:
    from petkit.serve.http import ServeSettings  # FastAPI: only once `petkit serve` runs

    for flag in ("max_adapters", "max_batch", "max_queue", "max_tokens", "max_body_kb"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    root = args.adapter_root or args.adapter_dir or "."
    return ServeSettings(model_name=args.served_model_name or args.model, api_key=args.api_key,
                         max_tokens=args.max_tokens, default_tokens=min(256, args.max_tokens),
                         max_body_bytes=args.max_body_kb * 1024,
                         adapter_root=Path(root).expanduser().resolve())


def command(args: argparse.Namespace, echo: Callable[[str], None],
            dotted: dict[str, str] | None = None) -> None:
    """Check everything cheap, load the base and adapters, serve until interrupted. `dotted`:
    the --model.F / --runtime.F options (app.serving reads model.quantize, runtime.device)."""
    for module in MODULES:
        require_module(module, EXTRA, "petkit serve")
    from petkit.serve.limits import check_bind, is_loopback  # pydantic: it comes with FastAPI

    check_bind(args.host, args.allow_remote)
    if not is_loopback(args.host) and not args.api_key:
        echo(f"warning: --host {args.host} with no --api-key: anyone who reaches this machine "
             "can use the API and load adapters")
    adapters = adapter_folders(args.adapter, args.adapter_dir)
    given = args.model or (None if adapters else DEFAULT_MODEL)
    args.model = base_name(args, adapters)
    settings = _settings(args)
    _check_device(args.device)
    recipe = base_recipe(given, adapters, args, dotted or {}, "serve")
    _check_device(recipe.runtime.device)  # --runtime.device, when given
    _check_port(args.host, args.port)
    engine = _engine(recipe, args, adapters, echo)
    _serve(engine, settings, args, echo)


def _engine(recipe: Any, args: argparse.Namespace, adapters: dict[str, Path],
            echo: Callable[[str], None]) -> Engine:
    echo(f"loading {args.model} ...")
    engine = load_engine(recipe, {}, max_batch=args.max_batch, max_adapters=args.max_adapters,
                         max_queue=args.max_queue, cuda_graphs=args.cuda_graphs)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
        echo(f"adapter {name}: {path}")
    return engine


def _serve(engine: Engine, settings: ServeSettings, args: argparse.Namespace,
           echo: Callable[[str], None]) -> None:
    import uvicorn  # the serve extra: only once `petkit serve` runs

    from petkit.serve.http import create_app  # FastAPI, likewise

    app = create_app(engine, settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    echo(f"serving {settings.model_name} + {len(engine.adapters())} adapters on "
         f"http://{host}:{args.port} (playground at /, API at /v1; Ctrl-C stops)")
    engine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, ws="none")
    finally:
        engine.stop()
