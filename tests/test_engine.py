"""serve.engine driven without HTTP: continuous batching over many adapters, each row equal to the
same request served alone (greedy, token for token), stop strings, seeds, cancel, queue limits,
the adapter LRU, refused folders, and the background thread."""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch

import petkit as pk
from petkit.core.delta import iter_deltas
from petkit.serve.engine import Engine, GenerationRequest, QueueFull, UnknownAdapter
from petkit.serve.text import TextStream

NAMES = ["lora4", "lora2", "dora3", "rslora8"]


def tiny_chat_model(seed: int = 0):
    """A 2-layer random Llama with SmolLM2's tokenizer (real text, a chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from petkit.models.embedded.smollm2 import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id or 0, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        for p in model.parameters():
            p.data.mul_(8.0)  # peaked logits: adapters change greedy answers, no near-ties
    return model.eval(), tok


CONFIGS = {"lora4": pk.LoraConfig(r=4, targets=["q_proj", "v_proj"]),
           "lora2": pk.LoraConfig(r=2, targets="all-linear"),
           "dora3": pk.DoraConfig(r=3, targets=["q_proj", "v_proj", "o_proj"]),
           "rslora8": pk.LoraConfig(r=8, rslora=True, targets=["k_proj", "down_proj"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tok = tiny_chat_model()
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        pk.attach(model, cfg, name=name, seed=i)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(10 + i)
            for p in pk.trainable_parameters(model).values():
                p.add_(torch.randn_like(p) * 0.5)
        paths[name] = pk.save_adapter(model, root / name, name=name)
        pk.detach(model, name)
    return model, tok, paths


def engine_of(setup, **kw) -> Engine:
    model, tok, paths = setup
    engine = Engine(copy.deepcopy(model), tok, **kw)
    for name in NAMES:
        engine.add_adapter(name, paths[name])
    return engine


def alone(setup, adapter, ids, n):
    """The reference: the model with only that adapter loaded, HF generate, greedy."""
    model, _, paths = setup
    m = copy.deepcopy(model)
    if adapter is not None:
        pk.load_adapter(m, paths[adapter], name=adapter)
    out = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def drive(engine, handles):
    for _ in range(1000):
        if not engine.step() and all(h.done for h in handles):
            return
    raise AssertionError("the engine did not finish")


def prompts(tok, n):
    words = ["tell me about cats", "what is 2+2", "write a poem", "hello there", "why is the sky blue",
             "name three colours", "a b c d e f", "the end"]
    return [tok(words[i % len(words)] * (1 + i % 3)).input_ids for i in range(n)]


def test_mixed_adapter_rows_equal_each_served_alone(setup):
    model, tok, _ = setup
    engine = engine_of(setup, max_batch=8, max_adapters=4)
    rows = [None, *NAMES, "lora4", None, "dora3"]
    ids = prompts(tok, len(rows))
    handles = [engine.submit(GenerationRequest(prompt_ids=p, adapter=a, max_new_tokens=6)) for p, a in zip(ids, rows)]
    drive(engine, handles)
    answers = {}
    for h, a, p in zip(handles, rows, ids):
        expect = alone(setup, a, p, 6)
        assert h.token_ids == expect, (a, h.token_ids, expect)
        assert h.finish_reason == ("length" if len(expect) == 6 else "stop")
        assert h.usage == {"prompt_tokens": len(p), "completion_tokens": len(expect), "total_tokens": len(p) + len(expect)}
        answers.setdefault(tuple(p), set()).add(tuple(h.token_ids))
    # the adapters matter: one prompt under the base and each adapter gives different answers
    same = ids[0]
    outs = {tuple(alone(setup, a, same, 6)) for a in [None, *NAMES]}
    assert len(outs) >= 4


def test_requests_join_a_running_batch_and_leave_it(setup):
    """A request submitted mid-decode joins at the next step; rows that finish leave; all exact."""
    _, tok, _ = setup
    engine = engine_of(setup, max_batch=3, max_adapters=2)
    ids = prompts(tok, 6)
    plan = [("lora2", 9), (None, 3), ("dora3", 5), ("rslora8", 4), ("lora4", 7), (None, 2)]
    handles = [engine.submit(GenerationRequest(prompt_ids=ids[0], adapter=plan[0][0], max_new_tokens=plan[0][1]))]
    engine.step()
    engine.step()
    for (a, n), p in zip(plan[1:], ids[1:]):
        handles.append(engine.submit(GenerationRequest(prompt_ids=p, adapter=a, max_new_tokens=n)))
        engine.step()
        assert engine.active_rows() <= 3
    drive(engine, handles)
    for h, (a, n), p in zip(handles, plan, ids):
        assert h.token_ids == alone(setup, a, p, n), a
    assert engine.active_rows() == 0 and engine.queue_depth() == 0
    assert engine.stats()["swaps"] >= 4  # 4 adapters through 2 resident slots


def test_text_stream_stop_strings_and_chat_template(setup):
    _, tok, _ = setup
    engine = engine_of(setup)
    msgs = [{"role": "user", "content": "Say something"}]
    full = engine.submit(GenerationRequest(messages=msgs, adapter="lora4", max_new_tokens=12))
    drive(engine, [full])
    pieces = list(full)
    assert "".join(pieces) == full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    text = full.text
    stop = text[3:5]
    cut = engine.submit(GenerationRequest(messages=msgs, adapter="lora4", max_new_tokens=12, stop=[stop]))
    drive(engine, [cut])
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    templ = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert full.usage["prompt_tokens"] == len(tok(templ, add_special_tokens=False).input_ids)


def test_seeded_sampling_is_reproducible_whatever_else_runs(setup):
    _, tok, _ = setup
    engine = engine_of(setup)
    p = prompts(tok, 1)[0]

    def sample(seed, company):
        hs = [engine.submit(GenerationRequest(prompt_ids=p, adapter="lora2", max_new_tokens=8, temperature=1.5,
                                              top_p=0.9, seed=seed))]
        hs += [engine.submit(GenerationRequest(prompt_ids=q, adapter=a, max_new_tokens=8, temperature=1.0, seed=7))
               for q, a in company]
        drive(engine, hs)
        return hs[0].token_ids

    first = sample(1, [])
    assert sample(1, [(prompts(tok, 3)[2], "dora3"), (p, None)]) == first
    assert any(sample(s, []) != first for s in (2, 3, 4))


def test_cancel_queue_full_unknown_adapter(setup):
    _, tok, _ = setup
    engine = engine_of(setup, max_batch=2, max_queue=3)
    p = prompts(tok, 1)[0]
    hs = [engine.submit(GenerationRequest(prompt_ids=p, adapter="lora4", max_new_tokens=50)) for _ in range(3)]
    with pytest.raises(QueueFull, match="--max-queue 3"):
        engine.submit(GenerationRequest(prompt_ids=p, max_new_tokens=4))
    with pytest.raises(UnknownAdapter, match="did you mean lora4"):
        engine.submit(GenerationRequest(prompt_ids=p, adapter="lora5"))
    engine.step()
    hs[0].cancel()
    hs[2].cancel()  # still queued
    engine.step()
    assert hs[0].finish_reason == "cancelled" and hs[2].finish_reason == "cancelled"
    assert engine.active_rows() == 1 and engine.queue_depth() == 0
    hs[1].cancel()
    engine.step()
    assert engine.active_rows() == 0
    assert "".join(hs[1]) == hs[1].text and list(hs[1]) == []  # iteration ends, and again at once
    with pytest.raises(pk.ConfigError, match="over the model's 256 positions"):
        engine.submit(GenerationRequest(prompt_ids=[5] * 250, max_new_tokens=10))
    with pytest.raises(pk.ConfigError, match="already loaded"):
        engine.add_adapter("lora4", setup[2]["lora4"])
    queued = [engine.submit(GenerationRequest(prompt_ids=p, adapter="lora2", max_new_tokens=3)) for _ in range(2)]
    engine.remove_adapter("lora2")  # queued requests for it are cancelled, with the reason
    assert [h.finish_reason for h in queued] == ["cancelled"] * 2 and "removed" in queued[0].error
    with pytest.raises(pk.ConfigError, match="exactly one of"):
        GenerationRequest(prompt_ids=p, prompt="x")
    with pytest.raises(pk.ConfigError, match="top_p"):
        GenerationRequest(prompt="x", top_p=0)


def test_refused_folder_changes_nothing_and_remove(setup, tmp_path):
    model, tok, paths = setup
    engine = engine_of(setup)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter.json").write_text("{not json")
    with pytest.raises(pk.AdapterLoadError):
        engine.add_adapter("bad", bad)
    other = tiny_chat_model(seed=5)[0]  # an adapter of another base: fingerprint refused
    pk.attach(other, pk.LoraConfig(r=2), name="x")
    wrong = pk.save_adapter(other, tmp_path / "wrong", name="x")
    with pytest.raises(pk.AdapterLoadError, match="different base"):
        engine.add_adapter("wrong", wrong)
    prompt = pk.attach(copy.deepcopy(model), pk.PromptConfig(num_virtual_tokens=2), name="p")
    with pytest.raises(pk.AdapterLoadError, match="prompt.*lora"):
        engine.add_adapter("p", pk.save_adapter(prompt, tmp_path / "p", name="p"))
    assert engine.adapters() == sorted(NAMES)
    assert not list(iter_deltas(engine.model))  # the model stays the plain base
    h = engine.submit(GenerationRequest(prompt_ids=prompts(tok, 1)[0], adapter="dora3", max_new_tokens=4))
    drive(engine, [h])
    assert h.token_ids == alone(setup, "dora3", prompts(tok, 1)[0], 4)
    engine.remove_adapter("dora3")
    assert "dora3" not in engine.adapters()
    with pytest.raises(UnknownAdapter):
        engine.submit(GenerationRequest(prompt_ids=[1, 2], adapter="dora3"))


def test_background_thread_serves_concurrent_clients(setup):
    _, tok, _ = setup
    engine = engine_of(setup, max_batch=4, max_adapters=2).start()
    try:
        ids = prompts(tok, 8)
        rows = [NAMES[i % 4] if i % 3 else None for i in range(8)]
        results: dict[int, str] = {}

        def client(i):
            h = engine.submit(GenerationRequest(prompt_ids=ids[i], adapter=rows[i], max_new_tokens=5))
            results[i] = "".join(h)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i in range(8):
            assert results[i] == tok.decode(alone(setup, rows[i], ids[i], 5), skip_special_tokens=True)
        assert engine.is_running()
    finally:
        engine.stop()
    assert not engine.is_running()


class Chars:
    """A tokenizer stand-in: token i is the i-th character of ALPHABET."""
    ALPHABET = "ab cd\nxy"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.ALPHABET[i] for i in ids)


def test_text_stream_holds_back_what_may_start_a_stop_string():
    stream = TextStream(Chars(), stop=["cd\n"])
    assert [stream.push(i) for i in (0, 1, 2, 3)] == ["a", "b", " ", ""]  # "c" may start "cd\n"
    assert stream.push(4) == "" and not stream.stopped  # "cd" still may
    assert stream.push(6) == "cdx" and not stream.stopped  # "cdx": not a stop, released
    stream = TextStream(Chars(), stop=["cd\n"])
    assert "".join(stream.push(i) for i in (0, 3, 4, 5, 6)) == "a" and stream.stopped
    assert stream.flush() == "" and stream.text == "a"
    stream = TextStream(Chars(), stop=["d\n"])
    assert stream.push(4) == "" and stream.flush() == "d"  # held text comes out at the end
