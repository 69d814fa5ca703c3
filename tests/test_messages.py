"""What the command line says when a user gets something wrong: the flags they typed (not the
library's field names), close names for a typo, whole sentences, and a fix that works for how
petkit was installed. Each refusal that depends only on arguments comes before any model loads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import petkit.app.pipeline as pipeline
from petkit.app.recipe import apply_overrides, load_recipe
from petkit.cli import main
from petkit.cli_flags import speak_flags
from petkit.core.errors import ConfigError, PetkitError
from petkit.models import load_model
from petkit.models.packages import extra_install


def refuse_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(pipeline, "load_model", refuse)


@pytest.mark.parametrize("message, spoken", [
    ("TrainConfig.max_steps must be an int >= 1, got 0", "--steps must be an int >= 1, got 0"),
    ("TrainConfig.weight_decay must be >= 0", "--train.weight_decay must be >= 0"),
    ("data.text_column='x' ...; drop data.text_column", "--text-column='x' ...; drop --text-column"),
    ("LoraConfig.r must be an int >= 1", "--rank must be an int >= 1"),
    ("train.stepper.eps must be > 0", "--eps must be > 0"),
    # file names and anything that is not a recipe field stay as they are
    ("cannot read runs/x/recipe.yaml or model.safetensors", "cannot read runs/x/recipe.yaml or model.safetensors"),
    ("name it with --resume-override=train.max_steps", "name it with --resume-override=train.max_steps"),
])
def test_library_messages_speak_in_flags(message: str, spoken: str) -> None:
    assert speak_flags(message) == spoken


@pytest.mark.parametrize("args, expected", [
    (["--method", "lorra"], "unknown method 'lorra' (did you mean 'lora'"),
    (["--data", "bbc-newz"], "unknown task 'bbc-newz' (did you mean 'bbc-news'?)"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
     "set --device to cpu or auto" if not torch.cuda.is_available() else "only"),
    (["--text-column", "tweet"], "--text-column='tweet' names a column of your own data file, "
                                 "but --data='rotten-tomatoes' is an embedded task"),
])
def test_cli_refusals_name_flags_and_close_names_before_loading(
        args: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    refuse_model_load(monkeypatch)
    started = time.perf_counter()
    assert main(["train", "--steps", "1", "--output", str(tmp_path / "run"), *args]) == 2
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_unknown_embedded_model_suggests_the_close_name_and_lists_every_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PetkitError) as caught:
        load_model("smollm-135m")
    message = str(caught.value)
    assert "did you mean 'smollm2-135m'?" in message
    for name in ("smollm2-135m", "minilm-l6", "dinov2-s"):
        assert name in message


def test_an_empty_model_folder_is_one_whole_sentence(tmp_path: Path) -> None:
    (tmp_path / "mymodel").mkdir()
    with pytest.raises(PetkitError, match=r"folder .*mymodel' holds no Hugging Face model "
                                          r"\(no config.json\)") as caught:
        load_model(str(tmp_path / "mymodel"))
    assert "\n" not in str(caught.value) and not str(caught.value).rstrip().endswith(":")


def test_comma_lists_are_lists_for_list_fields() -> None:
    recipe = apply_overrides(load_recipe("default"), {"method.targets": "q_proj, k_proj"})
    assert recipe.method_config().targets == ("q_proj", "k_proj")
    regex = apply_overrides(load_recipe("default"), {"method.targets": r".*\.(q|k)_proj"})
    assert regex.method_config().targets == r".*\.(q|k)_proj"
    repeat = apply_overrides(load_recipe("default"), {"method.targets": r"layers\.[0-9]{1,2}\.q_proj"})
    assert repeat.method_config().targets == r"layers\.[0-9]{1,2}\.q_proj"


def test_column_flags_with_an_embedded_task_are_refused() -> None:
    with pytest.raises(ConfigError, match="data.label_column='mood' names a column of your own"):
        apply_overrides(load_recipe("default"), {"data.label_column": "mood"})
    own = apply_overrides(load_recipe("default"), {"data.name": "tweets.csv",
                                                   "data.label_column": "mood"})
    assert own.data.label_column == "mood"


def test_missing_extra_names_its_packages_not_a_petkit_reinstall() -> None:
    command = extra_install("fed")
    assert command.startswith("pip install ") and "flwr" in command and "petkit[" not in command
    assert extra_install("no-such-extra") == "pip install 'petkit[no-such-extra]'"
