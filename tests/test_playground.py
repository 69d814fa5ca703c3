"""The playground page of `petkit serve`, in a real headless Chromium (Debian's package) driven by
Playwright: the page lists the models, a prompt streams answers side by side (several chunks
each, the same text the API gives), and switching adapters changes the answer. Screenshots go
to the test's tmp folder; with PETKIT_DOCS_SCREENSHOT=1 the real-model test also writes
docs/img/playground.png."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="petkit serve needs pip install 'petkit[serve]'")
CHROMIUM = "/usr/bin/chromium"
if shutil.which(CHROMIUM) is None:
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed "
                               "(pip install playwright; no browser download: Debian's chromium is used)")
import httpx  # noqa: E402

from petkit.serve.engine import Engine  # noqa: E402
from petkit.serve.http import ServeSettings, create_app  # noqa: E402
from serve_server import BASE, running_server, save_adapters, tiny_chat_model  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img" / "playground.png"


def _api_answer(url: str, model: str, prompt: str, tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "seed": 0}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()["choices"][0]["message"]["content"]


def _ask(page: Any, models: list[str], timeout_ms: int) -> dict[str, tuple[str, int]]:
    """Tick exactly `models`, press Send, wait for every column; {model: (text, chunks)}."""
    for box in page.locator("#models input").all():
        box.set_checked(box.get_attribute("value") in models)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('#answers article').length === {len(models)} && "
                           "[...document.querySelectorAll('#answers article')]"
                           ".every(a => a.dataset.state !== 'streaming')", timeout=timeout_ms)
    out = {}
    for card in page.locator("#answers article").all():
        assert card.get_attribute("data-state") == "done", card.inner_text()
        out[card.get_attribute("data-model")] = (card.locator("pre").inner_text(),
                                                 int(card.get_attribute("data-chunks")))
    return out


def _drive(url: str, base: str, adapters: list[str], prompt: str, tokens: int, shot: Path,
           timeout_ms: int) -> None:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(url + "/")
            page.wait_for_function(f"document.querySelectorAll('#models input').length === {1 + len(adapters)}")
            assert page.locator("#models input").evaluate_all("bs => bs.map(b => b.value)") == [base, *sorted(adapters)]
            assert page.is_checked(f"#models input[value='{base}']")  # the base is ticked at first
            page.fill("#prompt", prompt)
            page.fill("#max-tokens", str(tokens))
            first = _ask(page, [base, adapters[0]], timeout_ms)
            page.screenshot(path=str(shot), full_page=True)
            second = _ask(page, [base, adapters[1]], timeout_ms)
        finally:
            browser.close()
    for model, (text, chunks) in {**first, **second}.items():
        assert text == _api_answer(url, model, prompt, tokens), model  # the page shows the API's answer
        assert chunks > 1, f"{model}'s answer came in {chunks} chunk(s): not streamed"
    assert first[base][0] == second[base][0]
    assert first[adapters[0]][0] != second[adapters[1]][0] != second[base][0]  # switching changes it


def _serve_and_drive(model: Any, tokenizer: Any, name: str, folder: Path, shot: Path,
                     tokens: int, timeout_ms: int, scale: float) -> None:
    paths = save_adapters(model, folder, ["support", "pirate"], scale=scale)
    engine = Engine(model, tokenizer, max_batch=4, max_adapters=2, max_queue=8)
    for adapter, path in paths.items():
        engine.add_adapter(adapter, path)
    engine.start()
    try:
        with running_server(create_app(engine, ServeSettings(model_name=name))) as url:
            _drive(url, name, list(paths), "What is a good name for a cat?", tokens, shot, timeout_ms)
    finally:
        engine.stop()
    assert shot.stat().st_size > 10_000


def test_playground_streams_side_by_side_and_switching_adapters_changes_the_answer(tmp_path: Path) -> None:
    model, tokenizer = tiny_chat_model()
    _serve_and_drive(model, tokenizer, BASE, tmp_path / "adapters", tmp_path / "playground.png",
                     tokens=12, timeout_ms=120_000, scale=0.5)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a 135M model on a shared 2-core CPU
def test_playground_on_smollm2(tmp_path: Path) -> None:
    """The same on the real SmolLM2-135M: the base answers in words, the adapters otherwise."""
    from petkit.models.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    shot = tmp_path / "playground.png"
    _serve_and_drive(model, tokenizer, "smollm2-135m", tmp_path / "adapters", shot,
                     tokens=16, timeout_ms=600_000, scale=0.05)
    if os.environ.get("PETKIT_DOCS_SCREENSHOT") == "1":
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMG)
