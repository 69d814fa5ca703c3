"""Vision: the embedded mnist-5k task, image folders, pixel batches, methods on a ViT, the pipeline,
and (slow) the embedded dinov2-s against its ONNX file in onnxruntime."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import petkit as pk
from petkit.core.delta import DeltaModule
from petkit.data.embedded import task_names
from petkit.data.embedded.mnist_5k import load_mnist_5k
from petkit.data.images import collate_images, few_shot, load_image_folder, select_classes
from petkit.models.vision import check_image_size, load_vision_model, tiny_vision_model
from toys import TOYS, inputs, run

CONTRACT_ON_VIT = {"vpt", "lora", "dora", "adapter", "ia3", "bitfit", "ln-tuning", "late-prompt",
                   "dylora", "krona", "cola", "sira", "peqa", "vera", "oft", "hra", "hira", "loha",
                   "lokr", "adalora", "shira", "boft", "lily"}


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


def test_mnist_5k_is_real_stratified_and_registered(mnist):
    from petkit.data import EMBEDDED_TASKS, load_task

    assert task_names("image") == ["mnist-5k"] and "mnist-5k" in EMBEDDED_TASKS
    again = load_task("mnist-5k").test[:3]
    assert [e["image"].tobytes() for e in again] == [e["image"].tobytes() for e in mnist.test[:3]]
    assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
    assert Counter(e["label"] for e in mnist.test) == {d: 100 for d in range(10)}
    image = mnist.train[0]["image"]
    assert image.shape == (28, 28) and image.dtype == np.uint8 and image.max() > 200
    assert mnist.label_names == tuple("0123456789")
    train_bytes = {e["image"].tobytes() for e in mnist.train}
    assert not train_bytes & {e["image"].tobytes() for e in mnist.test}


def test_few_shot_and_class_subsets(mnist):
    high = select_classes(mnist.train, [5, 6, 7, 8, 9])
    assert {e["label"] for e in high} == set(range(5)) and len(high) == 2000
    shots = few_shot(high, 4, seed=0)
    assert Counter(e["label"] for e in shots) == {c: 4 for c in range(5)}
    assert [e["label"] for e in few_shot(high, 4, seed=0)] == [e["label"] for e in shots]
    with pytest.raises(pk.ConfigError, match="shots=999"):
        few_shot(high, 999, seed=0)


def test_collate_makes_normalised_rgb_pixels_of_the_asked_side():
    white = np.full((28, 28), 255, dtype=np.uint8)
    batch = collate_images([{"image": white, "labels": 3}, {"image": white * 0, "labels": 1}], 42)
    assert batch["pixel_values"].shape == (2, 3, 42, 42)
    assert batch["labels"].tolist() == [3, 1]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(batch["pixel_values"][0, :, 5, 5], (1 - mean) / std)
    torch.testing.assert_close(batch["pixel_values"][1, :, 5, 5], -mean / std)


def _folder(tmp_path, counts: dict[str, int]):
    from PIL import Image

    for name, count in counts.items():
        (tmp_path / name).mkdir(parents=True)
        for i in range(count):
            colour = (255, 0, 0) if name == "red" else (0, 0, 255)
            Image.new("RGB", (20, 12), colour).save(tmp_path / name / f"{i}.png")
    return tmp_path


def test_image_folder_is_a_task_with_one_class_per_subfolder(tmp_path):
    task = load_image_folder(_folder(tmp_path, {"red": 5, "blue": 5}))
    assert task.label_names == ("blue", "red")
    assert len(task.train) == 8 and Counter(e["label"] for e in task.test) == {0: 1, 1: 1}
    batch = collate_images([{"image": e["image"], "labels": e["label"]} for e in task.test], 14)
    red = batch["pixel_values"][batch["labels"].tolist().index(1)]
    assert red[0].mean() > 1 and red[2].mean() < 0  # the red channel is high, blue low


def test_image_folder_mistakes_are_clear(tmp_path):
    with pytest.raises(pk.ConfigError, match="needs >= 2 class sub-folders"):
        load_image_folder(_folder(tmp_path / "one", {"red": 3}))
    empty = _folder(tmp_path / "empty", {"red": 3, "blue": 0})
    with pytest.raises(pk.ConfigError, match=r"\['blue'\] hold no image"):
        load_image_folder(empty)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(pk.ConfigError, match="cannot read image"):
        collate_images([{"image": str(tmp_path / "bad.png"), "labels": 0}], 14)


def test_image_size_must_fit_the_patch_and_model_must_be_a_vit(tmp_path):
    with pytest.raises(pk.ConfigError, match="multiple of the model.s patch side 14"):
        check_image_size(100)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(pk.ConfigError, match="not a vision model"):
        load_vision_model(str(tmp_path), 2)


@pytest.mark.parametrize("method", [m for m, *_ in pk.list_methods()])
def test_every_method_attaches_to_a_vit_or_says_why(method):
    """Attaching with defaults works (and the contract table has a ViT row) or fails clearly."""
    model = TOYS["vit"](0)
    try:
        config = pk.make_config(method)
    except pk.ConfigError as err:  # no defaults to attach with (trainable-tokens: which rows)
        assert "must name" in str(err) or "needs" in str(err), err
        return
    try:
        pk.attach(model, config)
    except pk.PetkitError as err:  # says why: names the model and what it lacks, or the field
        # a default sized for real models (shira's r=32 entries per row) may not fit the toy
        assert method not in CONTRACT_ON_VIT or "lower r" in str(err), err
        assert (type(model).__name__ in str(err) and ("vpt" in str(err) or "no " in str(err))
                or isinstance(err, pk.ConfigError) and "--method." in str(err)), err
        assert not any(isinstance(m, DeltaModule) for m in model.modules())
        return
    assert method in CONTRACT_ON_VIT, f"{method} attaches to a ViT: add it to the contract table"
    assert run(model, inputs("vit")).shape == (2, 3)


def test_contract_table_has_the_vit_rows():
    from test_contract import CASES

    assert {c.method for c in CASES if c.toy == "vit"} == CONTRACT_ON_VIT
    assert {c.kwargs.get("deep", False) for c in CASES if c.method == "vpt"} == {False, True}


def test_pipeline_trains_vpt_on_an_image_folder(tmp_path):
    from petkit.app.pipeline import run_recipe
    from petkit.app.recipe import DataSpec, ModelSpec, Recipe

    tiny_vision_model(num_labels=2, image_size=16).save_pretrained(tmp_path / "vit")
    data = _folder(tmp_path / "images", {"red": 6, "blue": 6})
    recipe = Recipe(method={"name": "vpt", "deep": True}, model=ModelSpec(name=str(tmp_path / "vit")),
                    data=DataSpec(name=str(data), image_size=16),
                    train=pk.TrainConfig(lr=0.05, max_steps=4, batch_size=4, progress=False,
                                         output_dir=str(tmp_path / "run")))
    report = run_recipe(recipe, echo=lambda _: None)
    assert set(report.after) == {"loss", "accuracy"}
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()
    saved = pk.load_adapter(tiny_vision_model(num_labels=2, image_size=16),
                            str(tmp_path / "run" / "adapter"))
    assert pk.active_adapters(saved) == ["default"]


def test_cli_trains_on_mnist_5k_then_merges_to_a_plain_vit_folder(tmp_path, capsys):
    """`petkit train` (a few LoRA steps on mnist-5k) then `petkit merge`: the merged folder loads
    with transformers alone and gives the adapted model's logits; VPT says it cannot merge."""
    from transformers import AutoModelForImageClassification

    from petkit.app.adapter_base import recipe_for_adapter
    from petkit.app.pipeline import load_with_adapter
    from petkit.cli import main

    tiny_vision_model(num_labels=10, image_size=16).save_pretrained(tmp_path / "vit")
    common = ["--model", str(tmp_path / "vit"), "--data", "mnist-5k", "--train-size", "24",
              "--test-size", "8", "--steps", "3", "--batch-size", "8", "--data.image_size=16",
              "--train.progress=false"]
    assert main(["train", *common, "--method", "lora", "--output", str(tmp_path / "run")]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "tokenizer.json").exists()
    merged = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    adapted = load_with_adapter(recipe_for_adapter(adapter), adapter).model.eval()
    pixels = collate_images([{"image": e["image"], "labels": 0} for e in
                             load_mnist_5k().test[:4]], 16)["pixel_values"]
    with torch.no_grad():
        expected = adapted(pixel_values=pixels).logits
        torch.testing.assert_close(merged(pixel_values=pixels).logits, expected)
    assert not torch.allclose(expected, tiny_vision_model(10)(pixel_values=pixels).logits)

    assert main(["train", *common, "--method", "vpt", "--output", str(tmp_path / "vpt")]) == 0
    capsys.readouterr()
    assert main(["merge", "--adapter", str(tmp_path / "vpt" / "adapter"), "--output",
                 str(tmp_path / "vpt-merged")]) != 0
    assert "not mergeable" in capsys.readouterr().err


@pytest.mark.slow
def test_dinov2_s_matches_onnxruntime_on_real_digits(mnist):
    """The rebuilt backbone reproduces the ONNX graph's final hidden states on MNIST digits."""
    from transformers import Dinov2Model

    from petkit.models.vision import dinov2_s_dir, onnx_reference

    pixels = collate_images([{"image": e["image"], "labels": 0} for e in mnist.test[:3]],
                            224)["pixel_values"]
    model = Dinov2Model.from_pretrained(dinov2_s_dir()).eval()
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state
    expected = onnx_reference(pixels)
    assert ours.shape == expected.shape == (3, 257, 384)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_vit_methods_attach_to_dinov2_s_with_default_targets():
    """On the real dinov2-s: every method of the ViT contract rows attaches with its defaults,
    trains something and `disabled` gives the base exactly; the others fail and say why."""
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    base = load_vision_model("dinov2-s", 10, image_size=56)
    with torch.no_grad():
        expected = base(pixel_values=pixels).logits
    for method, *_ in pk.list_methods():
        model = load_vision_model("dinov2-s", 10, image_size=56)
        try:
            config = pk.make_config(method, modules_to_save=["classifier"])
        except pk.ConfigError as err:  # no defaults to attach with (trainable-tokens: which rows)
            assert method not in CONTRACT_ON_VIT and "--method." in str(err), err
            continue
        if method not in CONTRACT_ON_VIT:
            with pytest.raises(pk.PetkitError) as err:
                pk.attach(model, config)
            assert ("Dinov2ForImageClassification" in str(err.value)
                    or isinstance(err.value, pk.ConfigError) and "--method." in str(err.value))
            continue
        pk.attach(model, config)
        assert pk.trainable_parameters(model), method
        with torch.no_grad(), pk.disabled(model):
            torch.testing.assert_close(model(pixel_values=pixels).logits, expected)
        with torch.no_grad():
            assert model(pixel_values=pixels).logits.shape == (2, 10), method
