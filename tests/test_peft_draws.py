"""Under one torch seed, petkit's methods start from the very adapter PEFT 0.21 starts from (same
values, not only the same distribution: PEFT's throw-away draws are replayed), so the side-by-side
table in docs/methods.md compares the implementations' training, not two random inits."""
import copy

import pytest
import torch
from safetensors.torch import load_file

import petkit as pk
from petkit.benchmark.arms import peft_config
from toys import llama

peft = pytest.importorskip("peft")

# (method, petkit config fields): PEFT's config is the one the harness's PEFT arm writes from it.
# Not here: OFT (starts at zero, nothing drawn) and SHiRA (zero values; its mask comes from its own
# seeded generator and is checked by the exchange tests)
CASES = [
    ("lily", {"r": 4, "num_B": 3}),
    ("lily", {"r": 4, "stride_A": 2}),
    ("vera", {"r": 16}),
    ("loha", {"r": 2}),
    ("lokr", {"r": 2}),
    ("boft", {"block_size": 4}),
    ("hra", {"r": 4}),
    ("ln-tuning", {}),
]


@pytest.mark.parametrize("method,kwargs", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_same_seed_same_initial_adapter_as_peft(method, kwargs, tmp_path):
    base = llama()
    config = pk.make_config(method, **kwargs)
    twin = peft_config(method, config, base, "lm")
    torch.manual_seed(11)
    ours = pk.attach(copy.deepcopy(base), config)
    torch.manual_seed(11)
    theirs = peft.get_peft_model(copy.deepcopy(base), twin)
    pk.export_peft(ours, tmp_path / "ours")
    exported = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    expected = peft.get_peft_model_state_dict(theirs)
    assert exported.keys() == expected.keys()
    assert any(bool(t.any()) for t in expected.values())  # something was drawn
    for key, tensor in expected.items():
        assert torch.equal(exported[key], tensor), key
