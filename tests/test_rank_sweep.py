"""DyLoRA's rank flags: `petkit train --dylora-eval-ranks` and `petkit eval --rank` fail early and clearly."""
import pytest

import petkit as pk
from petkit.cli import main
from petkit.app.rank_sweep import check_ranks, parse_ranks


def test_parse_and_check_ranks():
    assert parse_ranks("1,2, 4,8") == [1, 2, 4, 8]
    for bad in ("", "a,b", "0,2"):
        with pytest.raises(pk.ConfigError, match="ranks must be"):
            parse_ranks(bad)
    check_ranks(pk.DyLoraConfig(r=8, min_rank=2), [2, 8])
    with pytest.raises(pk.ConfigError, match="eval_rank must be >= 2"):
        check_ranks(pk.DyLoraConfig(r=8, min_rank=2), [1])
    with pytest.raises(pk.ConfigError, match="range of ranks"):
        check_ranks(pk.LoraConfig(), [2])


@pytest.mark.parametrize("argv,message", [
    (["train", "--method", "lora", "--dylora-eval-ranks", "1,2"], "range of ranks"),
    (["train", "--method", "dylora", "--dylora-eval-ranks", "1,20"], "eval_rank must be <= 8"),
    (["eval", "--adapter", "nowhere", "--rank", "x"], "invalid int value"),
])
def test_cli_rank_mistakes_exit_2_before_any_work(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_new_classification_head_is_the_same_on_every_load():
    """A head-task adapter's fingerprint covers the new head, so `petkit eval` must see the same one."""
    import torch

    from petkit.models import load_model

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
    second, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
    assert torch.equal(first.classifier.weight, second.classifier.weight)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
