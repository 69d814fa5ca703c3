"""`petkit generate` / `petkit chat` end to end through petkit.cli.main: a tiny random Llama saved
as a model folder with SmolLM2's tokenizer, LoRA adapters saved beside it; answers compared with
Hugging Face `generate` on the chat-templated prompt (greedy)."""
from __future__ import annotations

import argparse
import copy
import io
import os
import subprocess
import sys

import pytest
import torch

import petkit as pk
from petkit.cli import main
from test_engine import tiny_chat_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model, tok = tiny_chat_model()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    paths = {}
    for i, name in enumerate(["kind", "terse"]):
        pk.attach(model, pk.LoraConfig(r=4, targets=["q_proj", "v_proj"]), name=name, seed=i)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(20 + i)
            for p in pk.trainable_parameters(model).values():
                p.add_(torch.randn_like(p) * 0.5)
        paths[name] = pk.save_adapter(model, root / "runs" / name / "adapter", name=name)
        pk.detach(model, name)
    return root, model, tok, paths


def expected(files, adapter, messages, n=6):
    _, model, tok, paths = files
    m = copy.deepcopy(model)
    if adapter:
        pk.load_adapter(m, paths[adapter], name=adapter)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def user(text):
    return [{"role": "user", "content": text}]


def test_generate_compare_labels_base_and_adapter(files, capsys):
    root, _, _, paths = files
    code = main(["generate", "--model", str(root / "base"), "--adapter", f"kind={paths['kind']}",
                 "--prompt", "Hello there", "--compare", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0
    assert out == f"[base] {expected(files, None, user('Hello there'))}\n" \
                  f"[kind] {expected(files, 'kind', user('Hello there'))}\n"
    assert expected(files, None, user("Hello there")) != expected(files, "kind", user("Hello there"))


def test_generate_reads_prompts_file_and_finds_base_from_recipe(files, capsys, tmp_path):
    root, _, _, paths = files
    (paths["terse"].parent / "recipe.yaml").write_text(f"model:\n  name: {root / 'base'}\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first question\n\nsecond one\n")
    code = main(["generate", "--adapter", str(paths["terse"]), "--prompts-file", str(prompts),
                 "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0
    want = [expected(files, "terse", user(p)) for p in ("first question", "second one")]
    assert out == f"{want[0]}\n\n{want[1]}\n"


def test_chat_reads_stdin_keeps_history_and_resets(files, capsys, monkeypatch):
    root, _, _, paths = files
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nHow are you\n/reset\nHow are you\n/exit\nnever read\n"))
    code = main(["chat", "--model", str(root / "base"), "--adapter", str(paths["kind"]), "--max-new-tokens", "5"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    one = expected(files, "kind", user("Hi"), 5)
    two = expected(files, "kind", [*user("Hi"), {"role": "assistant", "content": one}, *user("How are you")], 5)
    fresh = expected(files, "kind", user("How are you"), 5)
    assert lines[1:] == [one, two, "(conversation reset)", fresh]
    assert two != fresh  # the history was part of the second prompt


def test_sampling_flags_and_stop(files, capsys):
    root, _, _, paths = files
    args = ["generate", "--model", str(root / "base"), "--adapter", str(paths["kind"]), "--prompt", "Tell me",
            "--max-new-tokens", "8", "--temperature", "1.2", "--top-p", "0.9", "--seed"]
    main(args + ["3"])
    a = capsys.readouterr().out
    main(args + ["3"])
    assert capsys.readouterr().out == a
    outs = set()
    for seed in ("4", "5", "6"):
        main(args + [seed])
        outs.add(capsys.readouterr().out)
    assert outs - {a}
    greedy = expected(files, "kind", user("Tell me"), 8)
    stop = greedy[4:6]
    main(["generate", "--model", str(root / "base"), "--adapter", str(paths["kind"]), "--prompt", "Tell me",
          "--max-new-tokens", "8", "--stop", stop])
    assert capsys.readouterr().out == greedy[: greedy.index(stop)] + "\n"


def test_mistakes_are_one_red_line(files, capsys, tmp_path):
    root, _, _, paths = files
    bare = tmp_path / "bare" / "adapter"
    bare.parent.mkdir()
    import shutil

    shutil.copytree(paths["kind"], bare)
    cases = [(["generate", "--prompt", "x"], "give --model"),
             (["generate", "--adapter", str(tmp_path), "--prompt", "x"], "not an adapter folder"),
             (["generate", "--adapter", str(bare), "--prompt", "x"], "give the base with --model"),
             (["generate", "--model", str(root / "base"), "--adapter", f"a={paths['kind']}",
               "--adapter", f"a={paths['terse']}", "--prompt", "x"], "the name 'a' is taken"),
             (["generate", "--model", str(root / "base"), "--prompts-file", str(tmp_path / "none.txt")], "no such file"),
             (["generate", "--model", str(root / "base"), "--prompt", "x", "--top-p", "0"], "top_p")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_generate_with_the_embedded_model_in_a_subprocess():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "petkit", "generate", "--model", "smollm2-135m", "--prompt",
                          "What is the capital of France?", "--max-new-tokens", "12"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout


def test_generate_takes_the_runtime_section_and_refuses_what_it_does_not_read(files, capsys):
    """The base loads through the pipeline (app.serving) on --runtime.device; a training field is
    one red line naming what serving reads."""
    root, _, _, _ = files
    code = main(["generate", "--model", str(root / "base"), "--prompt", "Hello there",
                 "--runtime.device=cpu", "--max-new-tokens", "6"])
    assert code == 0 and capsys.readouterr().out == f"{expected(files, None, user('Hello there'))}\n"
    code = main(["generate", "--model", str(root / "base"), "--prompt", "Hi",
                 "--runtime.compile=true"])
    err = capsys.readouterr().err
    assert code == 2 and "reads only --model.name, --model.quantize, --runtime.device" in err


def test_the_base_of_an_adapter_comes_with_its_runs_quantisation(files, tmp_path):
    """Without --model, the base an adapter answers on is its run's model section, as `petkit
    eval` rebuilds it: a run on a quantised base serves on that base."""
    import shutil

    from petkit.app.serving import serving_recipe
    from petkit.serve.cli import base_recipe

    root, _, _, paths = files
    run = tmp_path / "run"
    shutil.copytree(paths["kind"], run / "adapter")
    (run / "recipe.yaml").write_text(f"model:\n  name: {root / 'base'}\n  quantize: nf4\n")
    args = argparse.Namespace(device="cpu")
    recipe = base_recipe(None, {"kind": run / "adapter"}, args, {}, "chat")
    assert (recipe.model.name, recipe.model.quantize, recipe.runtime.device) == (
        str(root / "base"), "nf4", "cpu")
    given = base_recipe(str(root / "base"), {"kind": run / "adapter"}, args, {}, "chat")
    assert given.model.quantize is None  # --model names the base as it is
    assert serving_recipe("m", {"model.quantize": "int8"}).model.quantize == "int8"
