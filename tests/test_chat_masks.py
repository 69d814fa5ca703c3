"""Chat templates and loss masks, token by token against hand-masked references.

The reference of each case is written by hand as (text, trained?) pieces of the rendered
conversation; its ids are each piece tokenised and laid end to end, its labels the ids of the
trained pieces and -100 elsewhere. `encode_chat` must give exactly those ids and labels, the ids
must equal the whole rendered text tokenised at once, and the loss petkit trains with must equal
a cross-entropy computed by hand over the trained positions only.
"""

from __future__ import annotations

import pytest
import torch

from petkit.core.errors import ConfigError
from petkit.data.chat import TEMPLATES, Template, encode_chat, encode_conversation, resolve_template
from petkit.data.encode import IGNORE_INDEX, collate
from petkit.models import resolve_model
from petkit.training.objectives import make_objective
from petkit.training.packing import pack

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHAT = [{"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *CHAT]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def reference(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def chatml_pieces(messages: list[dict], head: str = "") -> list[tuple[str, bool, int]]:
    """(text, is answer, message index) of chatml by hand, `head` before the first message."""
    out = [(head, False, -1)] if head else []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            out += [("<|im_start|>assistant\n", False, i), (m["content"] + "<|im_end|>\n", True, i)]
        else:
            out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False, i))
    return out


def select(pieces: list[tuple[str, bool, int]], train_on: str) -> list[tuple[str, bool]]:
    answers = [i for i, p in enumerate(pieces) if p[1]]
    keep = {"assistant": set(answers), "last": set(answers[-1:]),
            "all": set(range(len(pieces)))}[train_on]
    return [(text, i in keep) for i, (text, _, _) in enumerate(pieces)]


CASES = [  # (template flag, messages, system text the template adds)
    (None, CHAT, SYSTEM),  # SmolLM2's own template adds its default system turn
    (None, WITH_SYSTEM, ""),
    ("chatml", CHAT, ""),
    ("chatml", WITH_SYSTEM, ""),
]


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
@pytest.mark.parametrize("template,messages,head", CASES)
def test_masks_equal_the_hand_masked_reference(tok, template, messages, head, train_on) -> None:
    want_ids, want_labels = reference(tok, select(chatml_pieces(messages, head), train_on))
    (row,), stats = encode_chat([{"messages": messages}], tok, max_length=512, template=template,
                                train_on=train_on)
    assert row["input_ids"] == want_ids and row["labels"] == want_labels
    rendered = tok.apply_chat_template(messages, chat_template=resolve_template(tok, template).text,
                                       tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == want_ids
    assert stats.at_turn == stats.inside == 0 and stats.note("train", 512) is None


def test_assistant_loss_is_the_loss_on_assistant_tokens_only(tok) -> None:
    """The training objective's loss on encoded chats == cross-entropy over the hand-picked
    assistant positions of a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=256)).eval()
    rows = [{"messages": CHAT}, {"messages": WITH_SYSTEM[:3]}]
    encoded, _ = encode_chat(rows, tok, max_length=256, template="chatml")
    batch = collate(encoded, pad_id=0)
    with torch.no_grad():
        got = make_objective(None)(model, batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for b, messages in enumerate((CHAT, WITH_SYSTEM[:3])):
        ids, labels = reference(tok, select(chatml_pieces(messages), "assistant"))
        logp = torch.log_softmax(logits[b].double(), dim=-1)
        terms += [-logp[t - 1, ids[t]] for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    want = torch.stack(terms).mean()
    assert len(terms) > 10 and torch.allclose(got.double(), want, atol=1e-5, rtol=0)


def test_long_conversations_are_cut_at_a_turn_boundary(tok) -> None:
    pieces = select(chatml_pieces(CHAT), "assistant")
    first_exchange, _ = reference(tok, pieces[:3])
    full, _ = reference(tok, pieces)
    encoded, stats = encode_chat([{"messages": CHAT}] * 3, tok, max_length=len(full) - 1,
                                 template="chatml")
    want_ids, want_labels = reference(tok, pieces[:3])
    assert all(e["input_ids"] == want_ids and e["labels"] == want_labels for e in encoded)
    assert len(want_ids) == len(first_exchange) and (stats.at_turn, stats.inside) == (3, 0)
    assert stats.note("train", len(full) - 1) == (
        f"train: 3 of 3 conversations longer than --max-length {len(full) - 1} were cut "
        f"(3 at a turn boundary, 0 inside their first answer)")


def test_a_first_answer_too_long_is_cut_inside_keeping_answer_tokens(tok) -> None:
    (row,), stats = encode_chat([{"messages": CHAT}], tok, max_length=8, template="chatml")
    answer, _ = reference(tok, [("Hello! How can I help?<|im_end|>\n", True)])
    trained = [y for y in row["labels"] if y != IGNORE_INDEX]
    assert len(row["input_ids"]) == 8 and stats.inside == 1
    assert trained == answer[:len(trained)] and len(trained) >= 4


def test_instruction_rows_use_a_named_template(tok) -> None:
    (row,), _ = encode_chat([{"prompt": "Hi there", "completion": "Hello!"}], tok, max_length=64,
                            template="chatml")
    want = reference(tok, [("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", False),
                           ("Hello!<|im_end|>\n", True)])
    assert (row["input_ids"], row["labels"]) == want


def test_packing_keeps_the_masks(tok) -> None:
    encoded, _ = encode_chat([{"messages": CHAT}, {"messages": WITH_SYSTEM}], tok,
                             max_length=256, template="chatml")
    packed = pack(encoded, length=sum(len(e["input_ids"]) for e in encoded))
    want = [y for e in encoded for y in [IGNORE_INDEX, *e["labels"][1:]]]
    assert packed["labels"].shape[0] == 1 and packed["labels"][0].tolist() == want
    assert packed["input_ids"][0].tolist() == [t for e in encoded for t in e["input_ids"]]


def test_template_mistakes_are_clear(tok, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"--chat-template 'chatm1' .*did you mean 'chatml'"):
        resolve_template(tok, "chatm1")
    with pytest.raises(ConfigError, match="--train-on must be one of assistant, all, last"):
        encode_chat([{"messages": CHAT}], tok, max_length=64, train_on="user")
    # A template that writes the number of messages first: a longer chat is not an extension.
    odd = Template("{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                   "odd.jinja")
    with pytest.raises(ConfigError, match="does not render conversations incrementally"):
        encode_conversation(CHAT, tok, odd, max_length=64)
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(TEMPLATES["zephyr"], encoding="utf-8")
    assert resolve_template(tok, str(jinja)).text == TEMPLATES["zephyr"]


def test_a_model_without_a_template_falls_back_to_chatml(tok) -> None:
    class Plain:
        chat_template = None

    chosen = resolve_template(Plain(), None)
    assert chosen.text == TEMPLATES["chatml"] and "no chat template" in chosen.origin
