"""`petkit serve` as a command: mistakes refused before loading, a port in use, and the real
command in its own process talked to by the openai client."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="petkit serve needs pip install 'petkit[serve]'")
pytest.importorskip("openai", reason="the serve tests drive the server with the openai package")
httpx = pytest.importorskip("httpx")

from serve_server import BASE, save_adapters, tiny_chat_model  # noqa: E402
from test_serve_http import KEY, _chat, _client  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--host", "0.0.0.0"], "--allow-remote"),
    (["--adapter", "x=/no/such/folder"], "not an adapter folder"),
    (["--adapter-dir", "/no/such/folder"], "not a folder"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--device", "cuda:7"], "CUDA device"),
    (["--device", "toaster"], "not a device name"),
])
def test_serve_command_refuses_mistakes_before_loading(argv: list[str], message: str, capsys) -> None:
    from petkit.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_serve_command_refuses_a_port_in_use(capsys) -> None:
    from petkit.cli import main
    from serve_server import free_socket

    with free_socket() as taken:
        taken.listen()
        assert main(["serve", "--model", "smollm2-135m", "--port", str(taken.getsockname()[1])]) == 2
    assert "pick another --port" in capsys.readouterr().err


@pytest.mark.parametrize("argv, graphs", [([], True), (["--no-cuda-graphs"], False)])
def test_serve_command_passes_the_cuda_graph_switch_to_the_engine(argv, graphs, monkeypatch, capsys) -> None:
    from petkit.cli import main
    from petkit.core.errors import ConfigError
    from petkit.serve import serve_cli

    seen = {}

    def record(recipe, adapters, **settings):
        seen.update(settings)
        raise ConfigError("stopped before loading")

    monkeypatch.setattr(serve_cli, "load_engine", record)
    assert main(["serve", "--model", "smollm2-135m", *argv]) == 2
    assert seen["cuda_graphs"] is graphs and "stopped before loading" in capsys.readouterr().err


@pytest.mark.slow
def test_petkit_serve_end_to_end(tmp_path: Path) -> None:
    """The real command in its own process: a model folder, --adapter-dir, --api-key; the openai
    client talks to it; Ctrl-C (SIGINT) stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys

    from serve_server import free_socket

    model, tokenizer = tiny_chat_model()
    save_adapters(model, tmp_path / "adapters", ["kind", "terse"])
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with free_socket() as probe:
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "petkit", "serve", "--model", str(tmp_path / "base"), "--adapter-dir",
           str(tmp_path / "adapters"), "--port", str(port), "--api-key", KEY, "--served-model-name", BASE]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"petkit serve did not come up:\n{server.communicate()[0][-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = _client(url)
        assert [m.id for m in client.models.list().data] == [BASE, "kind", "terse"]
        answers = {m: _chat(client, m, "Hello", stream=m == "kind") for m in (BASE, "kind", "terse")}
        assert len(set(answers.values())) == 3 and all(answers.values())
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    assert f"serving {BASE} + 2 adapters on http://127.0.0.1:{port}" in output and "Traceback" not in output
