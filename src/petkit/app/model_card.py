"""The README.md that `petkit merge` / `petkit export` write into their folder: what the folder
holds and how to use it (base, method, task type, the prompt format and label words of a
verbaliser, the labels of a head, a snippet for transformers, PEFT or vLLM)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

INSTRUCTION_PROMPT = "Question: {prompt}\nAnswer:"  # data.encode, for tokenizers without a chat template


@dataclass(frozen=True)
class Card:
    """What a folder's model card says."""

    kind: str  # merged | peft | vllm
    base: str  # the name another tool loads the base by (hub id, folder)
    method: str
    config: dict[str, Any]
    task: dict[str, Any] = field(default_factory=dict)  # adapter.json's task record
    chat_template: bool = False  # the tokenizer has one (instruction prompts go through it)
    max_lora_rank: int | None = None  # vllm
    image: bool = False  # an image classifier (no tokenizer: pixels as petkit.data.images makes them)


def _task_lines(card: Card) -> list[str]:
    task, kind = card.task, card.task.get("type", "unknown")
    column = task.get("input_column")
    lines = [f"- task type: {kind}"]
    if kind == "verbaliser":
        lines += ["- how it classifies: the logits of the next token after the prompt, read at "
                  "the first token of each label word (highest wins)",
                  f"- prompt format: `{json.dumps(task.get('template', '{text}'))}`, with "
                  f"`{{text}}` the row's text{f' (column `{column}`)' if column else ''}",
                  "- labels and their words: " + ", ".join(
                      f"`{label}` -> `{json.dumps(word)}`"
                      for label, word in zip(task.get("labels", []), task.get("label_words", [])))]
    elif kind == "head":
        lines.append("- labels (the classification head's outputs, in order): "
                     + ", ".join(f"`{label}`" for label in task.get("labels", [])))
    elif kind == "instruction":
        fmt = "the tokenizer's chat template (one user message)" if card.chat_template else \
            f"`{json.dumps(INSTRUCTION_PROMPT)}`"
        lines.append(f"- prompt format: {fmt}; the model answers with the completion")
    return lines


def _classify_snippet(task: dict[str, Any], load: str) -> str:
    template = task.get("template", "{text}")
    words = dict(zip(task.get("labels", []), task.get("label_words", [])))
    return f"""{load}
template = {template!r}
label_words = {words!r}
ids = [tok(w, add_special_tokens=False).input_ids[0] for w in label_words.values()]
inputs = tok(template.replace("{{text}}", "your text here"), return_tensors="pt")
with torch.no_grad():
    probs = model(**inputs).logits[0, -1, ids].softmax(-1)
print(dict(zip(label_words, probs.tolist())))"""


def _head_snippet(load: str) -> str:
    return f"""{load}
inputs = tok(["your text here"], return_tensors="pt", truncation=True)
with torch.no_grad():
    probs = model(**inputs).logits.softmax(-1)[0]
print({{model.config.id2label[i]: p for i, p in enumerate(probs.tolist())}})"""


def _generate_snippet(chat: bool, load: str) -> str:
    prompt = ('ids = tok.apply_chat_template([{"role": "user", "content": "your question"}], '
              'add_generation_prompt=True, return_tensors="pt")') if chat else \
        f'ids = tok({INSTRUCTION_PROMPT.replace("{prompt}", "your question")!r}, return_tensors="pt").input_ids'
    return f"""{load}
{prompt}
out = model.generate(ids, max_new_tokens=64, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))"""


def _loader(card: Card, where: str) -> str:
    auto = "AutoModelForSequenceClassification" if card.task.get("type") == "head" else \
        "AutoModelForCausalLM"
    lines = ["import torch", f"from transformers import {auto}, AutoTokenizer"]
    if card.kind == "merged":
        lines += [f"tok = AutoTokenizer.from_pretrained({where!r})",
                  f"model = {auto}.from_pretrained({where!r}).eval()"]
    else:
        labels = card.task.get("labels") or []
        size = f", num_labels={len(labels)}" if card.task.get("type") == "head" else ""
        lines[1:1] = ["from peft import PeftModel"]
        lines += [f"tok = AutoTokenizer.from_pretrained({card.base!r})",
                  f"model = PeftModel.from_pretrained({auto}.from_pretrained({card.base!r}{size}), "
                  f"{where!r}).eval()"]
    return "\n".join(lines)


def _image_snippet(where: str) -> str:
    return f"""import torch
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({where!r}).eval()
size = model.config.image_size  # your image: RGB, resized to size x size, ImageNet-normalised
pixel_values = torch.zeros(1, 3, size, size)
with torch.no_grad():
    probs = model(pixel_values=pixel_values).logits.softmax(-1)[0]
print({{model.config.id2label[i]: p for i, p in enumerate(probs.tolist())}})"""


def snippet(card: Card, where: str) -> str:
    """Python that loads the folder `where` and uses it for its task."""
    if card.image:
        return _image_snippet(where)
    load = _loader(card, where)
    kind = card.task.get("type")
    if kind == "head":
        return _head_snippet(load)
    if kind == "verbaliser":
        return _classify_snippet(card.task, load)
    return _generate_snippet(card.chat_template, load)


def _vllm_section(card: Card, where: str) -> str:
    return f"""## Serve with vLLM

```bash
vllm serve {card.base} --enable-lora --max-lora-rank {card.max_lora_rank} \\
    --lora-modules adapter={where}
```

Requests then name `"model": "adapter"` (the base alone: `"model": "{card.base}"`).
"""


def render(card: Card, where: str = ".") -> str:
    """The README.md text for the folder, its snippet loading from `where`."""
    what = {"merged": "a plain Hugging Face model: the adapter is merged into the base's weights; "
                      "transformers loads it alone (no petkit, no PEFT)",
            "peft": "a Hugging Face PEFT LoRA adapter (adapter_config.json + "
                    "adapter_model.safetensors) for the base below",
            "vllm": "a PEFT LoRA adapter that vLLM's LoRA loader accepts, for the base below"}
    settings = ", ".join(f"{k}={v}" for k, v in card.config.items()
                         if k in ("r", "alpha", "rslora", "targets") and v not in (None, False))
    lines = [f"# {card.method} adapter for {card.base} ({card.kind}, written by petkit)", "",
             f"This folder is {what[card.kind]}.", "",
             f"- base model: `{card.base}`", f"- method: {card.method} ({settings})",
             *_task_lines(card), "", "## Use with Python", "", "```python",
             snippet(card, where), "```", ""]
    if card.kind == "vllm":
        lines.append(_vllm_section(card, where))
    return "\n".join(lines)
