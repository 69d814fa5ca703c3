"""`petkit serve`'s HTTP layer against a real uvicorn server on 127.0.0.1 (a free port, in a
thread, torn down at the end), driven with the `openai` client package and raw httpx: the OpenAI
shapes, streaming, every error status, hostile adapter folders, a client leaving mid-stream, no
cross-talk under concurrent mixed-adapter load, and a bounded load test (32 clients, 8 adapters).
"""
from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="petkit serve needs pip install 'petkit[serve]'")
pytest.importorskip("openai", reason="the serve tests drive the server with the openai package")
httpx = pytest.importorskip("httpx")

from petkit.core.errors import ConfigError  # noqa: E402
from petkit.serve.engine import Engine  # noqa: E402
from petkit.serve.http import ServeSettings, create_app  # noqa: E402
from petkit.serve.limits import check_bind  # noqa: E402
from serve_server import BASE, running_server, save_adapters, tiny_chat_model  # noqa: E402

KEY = "test-key"
ADAPTERS = [f"a{i}" for i in range(8)]
LIMIT = 400  # --max-tokens of the test server


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """(base url, engine, adapter root) of a running server: base + 8 adapters, key required."""
    root = tmp_path_factory.mktemp("adapters")
    model, tokenizer = tiny_chat_model()
    paths = save_adapters(model, root / "served", ADAPTERS + ["spare"])
    engine = Engine(model, tokenizer, max_batch=16, max_adapters=4, max_queue=64)
    for name in ADAPTERS:
        engine.add_adapter(name, paths[name])
    settings = ServeSettings(model_name=BASE, api_key=KEY, max_tokens=LIMIT, default_tokens=8,
                             max_body_bytes=64 * 1024, adapter_root=root / "served")
    engine.start()
    try:
        with running_server(create_app(engine, settings)) as url:
            yield url, engine, root
    finally:
        engine.stop()


def _client(url: str, key: str = KEY):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def _chat(client, model: str, prompt: str, tokens: int = 8, stream: bool = False) -> str:
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        out = client.chat.completions.create(model=model, messages=messages, max_tokens=tokens,
                                             temperature=0)
        return out.choices[0].message.content
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=tokens,
                                            temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _post(url: str, path: str, body: object, key: str = KEY, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, timeout=60, **kw,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def _error(response: httpx.Response, status: int) -> dict:
    """The OpenAI error object of a response that must have `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    return error


def test_models_lists_the_base_then_every_adapter(setup) -> None:
    url, _, _ = setup
    models = _client(url).models.list().data
    assert [m.id for m in models] == [BASE, *ADAPTERS]


def test_chat_streamed_and_whole_agree_and_adapters_differ(setup) -> None:
    url, _, _ = setup
    client = _client(url)
    answers = {m: _chat(client, m, "Tell me a story") for m in [BASE, "a0", "a1"]}
    assert len(set(answers.values())) == 3, answers  # each adapter changes the answer
    for model, whole in answers.items():
        assert _chat(client, model, "Tell me a story", stream=True) == whole


def test_completions_text_and_usage(setup) -> None:
    url, engine, _ = setup
    out = _client(url).completions.create(model="a2", prompt="Once upon a time", max_tokens=6,
                                          temperature=0)
    assert out.object == "text_completion" and out.choices[0].text
    assert out.usage.completion_tokens <= 6 and out.usage.prompt_tokens > 0
    streamed = _client(url).completions.create(model="a2", prompt="Once upon a time", max_tokens=6,
                                               temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text
    ids = engine.tokenizer("Once upon a time").input_ids  # the same prompt as token ids
    by_ids = _client(url).completions.create(model="a2", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text
    echo = {"model": "a2", "prompt": "Hi", "echo": True}
    assert _error(_post(url, "/v1/completions", echo), 400)["param"] == "echo"


def test_stream_is_server_sent_events_in_openai_chunk_format(setup) -> None:
    url, _, _ = setup
    body = {"model": "a3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    response = _post(url, "/v1/chat/completions", body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": BASE}, 400, "messages"),
    ({"model": BASE, "messages": []}, 400, "messages"),
    ({"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
])
def test_bad_requests_get_openai_errors(setup, body: dict, status: int, param: str) -> None:
    url, _, _ = setup
    error = _error(_post(url, "/v1/chat/completions", body), status)
    assert error["param"] == param


def test_bad_json_wrong_key_unknown_route_and_body_size(setup) -> None:
    url, _, _ = setup
    assert _error(_post(url, "/v1/chat/completions", b"{not json"), 400)["code"] == "invalid_json"
    assert _error(_post(url, "/v1/chat/completions", {}, key="wrong"), 401)["code"] == "invalid_api_key"
    assert _error(httpx.get(url + "/v1/models"), 401)["code"] == "invalid_api_key"
    _error(httpx.get(url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}), 404)
    big = {"model": BASE, "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert _error(_post(url, "/v1/chat/completions", big), 413)["code"] == "body_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 8192

    response = httpx.post(url + "/v1/chat/completions", content=chunked(), timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})
    _error(response, 413)


def test_openai_client_raises_its_own_error_types(setup) -> None:
    import openai

    url, _, _ = setup
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _chat(_client(url), "a9", "x")
    with pytest.raises(openai.AuthenticationError):
        _chat(_client(url, key="wrong"), BASE, "x")
    with pytest.raises(openai.BadRequestError, match="limit"):
        _chat(_client(url), BASE, "x", tokens=LIMIT + 1)


def _reshaped(folder: Path) -> None:
    """Every tensor cut to half its rows, the checksum in adapter.json made to match: only the
    shape check can refuse it."""
    from safetensors.torch import load_file, save_file

    from petkit.core.disk import file_sha256

    tensors = {k: v[: max(1, v.shape[0] // 2)].clone() for k, v in load_file(folder / "adapter.safetensors").items()}
    save_file(tensors, folder / "adapter.safetensors")
    meta = json.loads((folder / "adapter.json").read_text())
    meta["tensors_sha256"] = file_sha256(folder / "adapter.safetensors")
    (folder / "adapter.json").write_text(json.dumps(meta))


def _hostile_folders(root: Path, good: Path) -> dict[str, Path]:
    """Adapter folders a load endpoint must refuse, built from a good one."""
    out = {name: root / name for name in ("corrupt", "missing", "empty", "shapes", "json", "other-base")}
    for folder in out.values():
        shutil.copytree(good, folder)
    (out["corrupt"] / "adapter.safetensors").write_bytes(b"\x00garbage" * 100)
    (out["missing"] / "adapter.safetensors").unlink()
    for child in out["empty"].iterdir():
        child.unlink()
    (out["json"] / "adapter.json").write_text("{ not json")
    _reshaped(out["shapes"])
    other, _ = tiny_chat_model(seed=1)
    wide = save_adapters(other, root / "wide", ["wide"], r=8)["wide"]
    shutil.rmtree(out["other-base"])
    shutil.copytree(wide, out["other-base"])  # rank 8 on another base: its fingerprint differs
    return out


def test_hostile_adapter_folders_are_refused_and_the_server_keeps_serving(setup, tmp_path) -> None:
    url, engine, root = setup
    client = _client(url)
    before = _chat(client, "a4", "Hello")
    hostile = _hostile_folders(root / "served", root / "served" / "spare")
    # a corrupt file is refused from its safetensors header (declared sizes) or its checksum
    why = {"corrupt": ("checksum", "not a safetensors file"), "missing": ("missing",),
           "empty": ("missing",), "shapes": ("has shape", "shape"), "json": ("not valid JSON",),
           "other-base": ("different base",)}
    for name, folder in hostile.items():
        error = _error(_post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)}), 400)
        assert error["code"] == "invalid_adapter" and any(w in error["message"] for w in why[name]), \
            (name, error)
    outside = _post(url, "/v1/load_lora_adapter", {"lora_name": "out", "lora_path": str(tmp_path)})
    assert "outside" in _error(outside, 400)["message"]
    escape = _post(url, "/v1/load_lora_adapter",
                   {"lora_name": "up", "lora_path": str(root / "served" / ".." / "wide" / "wide")})
    assert "outside" in _error(escape, 400)["message"]
    assert engine.adapters() == ADAPTERS
    assert _chat(client, "a4", "Hello") == before


def test_load_use_and_unload_at_run_time(setup) -> None:
    url, _, root = setup
    client = _client(url)
    body = {"lora_name": "spare", "lora_path": str(root / "served" / "spare")}
    assert _post(url, "/v1/load_lora_adapter", body).status_code == 200
    _error(_post(url, "/v1/load_lora_adapter", body), 400)  # already loaded
    assert "spare" in [m.id for m in client.models.list().data]
    assert _chat(client, "spare", "Hello") not in {_chat(client, BASE, "Hello"), _chat(client, "a0", "Hello")}
    assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "spare"}).status_code == 200
    _error(_post(url, "/v1/unload_lora_adapter", {"lora_name": "spare"}), 404)
    _error(_post(url, "/v1/chat/completions",
                 {"model": "spare", "messages": [{"role": "user", "content": "x"}]}), 404)


def _requests(clients: int) -> list[tuple[str, str, bool]]:
    """(model, prompt, stream) per client: base and all 8 adapters, mixed prompts and modes."""
    models = [BASE, *ADAPTERS]
    return [(models[i % len(models)], f"Question {i % 5}: what is {i % 3}?", i % 2 == 0)
            for i in range(clients)]


def test_concurrent_mixed_adapters_equal_each_request_served_alone(setup) -> None:
    """No cross-talk, and a bounded load test: 32 clients at once over 8 adapters (and the base),
    0 errors, every answer equal to the same request served alone (greedy); p50/p99 printed."""
    url, _, _ = setup
    client = _client(url)
    jobs = _requests(32)
    alone = {job: _chat(client, job[0], job[1], stream=job[2]) for job in set(jobs)}
    barrier = threading.Barrier(len(jobs), timeout=60)

    def run(job: tuple[str, str, bool]) -> tuple[str, float]:
        barrier.wait()
        start = time.perf_counter()
        return _chat(_client(url), job[0], job[1], stream=job[2]), time.perf_counter() - start

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs, timeout=300))
    wrong = [(job, got) for job, (got, _) in zip(jobs, results) if got != alone[job]]
    assert not wrong
    latency = sorted(t for _, t in results)
    print(f"32 clients: p50 {statistics.median(latency):.3f}s, p99 {latency[-1]:.3f}s")


def test_a_client_leaving_mid_stream_frees_its_row_and_others_finish_unchanged(setup, monkeypatch) -> None:
    url, engine, _ = setup
    client = _client(url)
    others = [("a5", "Keep going"), ("a6", "Another one"), (BASE, "Base too")]
    alone = {job: _chat(client, *job, tokens=24) for job in others}
    handles, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda request: handles.append(submit(request)) or handles[-1])
    body = {"model": "a7", "messages": [{"role": "user", "content": "Long"}], "max_tokens": LIMIT,
            "temperature": 0, "stream": True}
    with ThreadPoolExecutor(len(others)) as pool:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            lines = response.iter_lines()
            futures = [pool.submit(_chat, _client(url), *job, 24) for job in others]
            assert sum(1 for line, _ in zip(lines, range(3)) if line.startswith("data: ")) >= 1
        results = {job: f.result(timeout=120) for job, f in zip(others, futures)}
    assert results == alone  # the others finish unchanged
    leaver = next(h for h in handles if h.request.adapter == "a7")
    assert leaver.wait(timeout=30) and leaver.finish_reason == "cancelled"
    assert leaver.usage["completion_tokens"] < LIMIT  # its row left early: freed, not run to the end
    deadline = time.monotonic() + 30
    while engine.active_rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active_rows() == 0
    assert _metric(url, "petkit_requests_in_flight") == 0


def test_queue_full_is_503_and_health_and_metrics(tmp_path) -> None:
    model, tokenizer = tiny_chat_model()
    engine = Engine(model, tokenizer, max_batch=1, max_adapters=1, max_queue=1)
    engine.start()
    body = {"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    try:
        with running_server(create_app(engine, ServeSettings(model_name=BASE, max_tokens=400))) as url:
            assert httpx.get(url + "/health").json() == {"status": "ok"}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as running:
                lines = running.iter_lines()  # kept: a dropped iterator closes the stream
                next(lines)  # the first request holds the only row
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60):
                    error = _error(_post(url, "/v1/chat/completions", body), 503)
            assert error["code"] == "queue_full" and error["type"] == "server_overloaded"
            assert _metric(url, 'petkit_requests_total{endpoint="/v1/chat/completions",status="503"}') == 1
            assert _metric(url, "petkit_queue_depth") >= 0
    finally:
        engine.stop()


def _metric(url: str, name: str) -> float:
    """The value of one sample of /metrics, named with its labels as the text shows them."""
    text = httpx.get(url + "/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    assert name in samples, f"{name} not in /metrics:\n{text}"
    return float(samples[name])


def test_metrics_count_requests_tokens_and_latency(setup) -> None:
    url, _, _ = setup
    _chat(_client(url), "a1", "Count me")
    text = httpx.get(url + "/metrics").text
    assert _metric(url, 'petkit_requests_total{endpoint="/v1/chat/completions",status="200"}') >= 1
    assert _metric(url, "petkit_completion_tokens_total") >= 1
    assert 'petkit_request_latency_seconds_bucket{endpoint="/v1/chat/completions",le="+Inf"}' in text


@pytest.mark.parametrize("host, ok", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                      ("127.0.0.9", True), ("0.0.0.0", False), ("192.168.1.4", False),
                                      ("example.org", False)])
def test_binding_beyond_loopback_needs_allow_remote(host: str, ok: bool) -> None:
    if ok:
        check_bind(host, allow_remote=False)
    else:
        with pytest.raises(ConfigError, match="--allow-remote"):
            check_bind(host, allow_remote=False)
        check_bind(host, allow_remote=True)
