"""LoRA initialisations (`init=`): numerics against closed forms and against the installed PEFT's
implementation of the same init on the same weights; the frozen offset (PiSSA, OLoRA, CorDA,
LoRA-GA) never trains, survives save/load, and exports to PEFT as one rank-2r LoRA."""
import copy

import pytest
import torch

import petkit as pk
from petkit.core.delta import iter_deltas
from petkit.core.initialize import pending
from toys import inputs, llama, perturb, run

peft = pytest.importorskip("peft")
QV = ["q_proj", "v_proj"]


def close(a, b, tol=1e-5):
    assert (a - b).abs().max() <= tol, float((a - b).abs().max())


def wrappers(model):
    return {p: w for p, w in iter_deltas(model)}


def peft_layers(p):
    return {n.removeprefix("base_model.model."): m for n, m in p.named_modules() if hasattr(m, "lora_A")
            and "default" in getattr(m, "lora_A", {})}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_match_peft_and_keep_the_model(init):
    base, batch = llama(), inputs("llama")
    theirs, expected = copy.deepcopy(base), run(base, batch)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(QV))}
    torch.manual_seed(0)
    pk.attach(base, pk.LoraConfig(r=4, alpha=8, targets=QV, init=init))
    torch.manual_seed(0)
    p = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=init))
    ours, layers = wrappers(base), peft_layers(p)
    assert set(ours) == set(layers) == set(originals)
    for path, w in ours.items():
        layer, s = layers[path], w.scaling
        close(w.lora_A, layer.lora_A["default"].weight)
        close(w.lora_B, layer.lora_B["default"].weight)
        # the base seen through the adapter is PEFT's edited residual; with B A it gives W back
        close(originals[path] - s * w.init_B @ w.init_A, layer.base_layer.weight)
        close(originals[path] - s * w.init_B @ w.init_A + s * w.lora_B @ w.lora_A, originals[path])
        if init == "pissa":  # s B A is W's top-r SVD part
            u, sv, vh = torch.linalg.svd(originals[path])
            close(s * w.lora_B @ w.lora_A, u[:, :4] * sv[:4] @ vh[:4])
    torch.testing.assert_close(run(base, batch), expected, rtol=0, atol=0)  # identity at init, exactly
    perturb(pk.trainable_parameters(base), seed=3)
    for path, w in ours.items():  # the same trained values in both
        layers[path].lora_A["default"].weight.data.copy_(w.lora_A)
        layers[path].lora_B["default"].weight.data.copy_(w.lora_B)
    close(run(base, batch), run(p.eval(), batch))


def test_fast_svd_pissa_is_near_the_top_r_part_and_keeps_the_model():
    base, batch = llama(), inputs("llama")
    expected = run(base, batch)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(QV))}
    pk.attach(base, pk.LoraConfig(r=4, alpha=8, targets=QV, init="pissa_niter_4"), seed=0)
    for path, w in wrappers(base).items():
        part, s = w.scaling * w.lora_B @ w.lora_A, torch.linalg.svdvals(originals[path])
        close(originals[path] - w.scaling * w.init_B @ w.init_A + part, originals[path])
        best = s[4:].pow(2).sum().sqrt()  # Eckart-Young: the error of the exact top-4 part
        assert torch.linalg.matrix_norm(originals[path] - part) <= 1.05 * best
    torch.testing.assert_close(run(base, batch), expected, rtol=0, atol=0)


def test_offset_is_frozen_saved_and_exported_as_a_rank_2r_lora(tmp_path):
    base, batch = llama(), inputs("llama")
    fresh, again = copy.deepcopy(base), copy.deepcopy(base)
    pk.attach(base, pk.LoraConfig(r=4, alpha=8, targets=QV, init="pissa"))
    assert not any(k.endswith(("init_A", "init_B")) for k in pk.trainable_parameters(base))
    start = {k: v.detach().clone() for k, v in pk.adapter_state(base, "default").items() if "init_" in k}
    opt = torch.optim.AdamW(pk.trainable_parameters(base).values(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        run(base, batch).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = pk.adapter_state(base, "default")
    assert all(torch.equal(state[k], v) for k, v in start.items())  # never trained, nor decayed
    expected = run(base, batch)
    with pk.disabled(base):
        close(run(base, batch), run(fresh, batch), tol=0)  # disabled: the untouched base
    pk.save_adapter(base, tmp_path / "a")
    pk.load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(run(again, batch), expected, rtol=0, atol=0)
    pk.merge(again)
    close(run(again, batch), expected)
    pk.export_peft(base, tmp_path / "peft")
    p = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "peft").eval()
    assert p.peft_config["default"].r == 8 and p.peft_config["default"].lora_alpha == 16
    close(run(p, batch), expected)
    pk.import_peft(fresh, tmp_path / "peft")
    close(run(fresh, batch), expected)


def test_peft_residual_folder_is_refused_and_its_conversion_loads(tmp_path):
    base, batch = llama(), inputs("llama")
    original, ours = copy.deepcopy(base), copy.deepcopy(base)
    p = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="pissa"))
    p.save_pretrained(tmp_path / "init")  # PEFT's starting point, for its conversion
    perturb({n: q for n, q in p.named_parameters() if q.requires_grad}, seed=1)
    p.save_pretrained(tmp_path / "raw")
    with pytest.raises(pk.AdapterLoadError, match="path_initial_model_for_weight_conversion"):
        pk.import_peft(copy.deepcopy(original), tmp_path / "raw")
    p.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    pk.import_peft(ours, tmp_path / "plain")
    close(run(ours, batch), run(p.eval(), batch))


def _centered_top(xs, r):
    x = torch.cat(xs).double()
    return torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:r].float()


def test_eva_starts_from_the_inputs_principal_directions():
    base, batch = llama(), inputs("llama")
    expected, seen = run(base, batch), {}
    keep = batch["attention_mask"].bool()  # padding tokens are left out
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0][keep]))
             for n, m in base.named_modules() if n.endswith(tuple(QV))]
    run(base, batch)
    for h in hooks:
        h.remove()
    pk.attach(base, pk.LoraConfig(r=3, targets=QV, init="eva"))
    with pytest.raises(pk.ConfigError, match="at least one batch"):
        pk.initialize(base, [])
    pk.initialize(base, [batch])
    for path, w in wrappers(base).items():
        ref = _centered_top(seen[path], 3)
        close((w.lora_A @ ref.T).abs(), torch.eye(3), tol=1e-3)  # the same directions, up to sign
        assert not w.lora_B.any()
    torch.testing.assert_close(run(base, batch), expected, rtol=0, atol=0)
    with pytest.raises(pk.ConfigError, match="no data-driven initialisation waiting"):
        pk.initialize(base, [batch])


def test_corda_matches_peft_on_one_batch():
    base = llama()
    batch = {"input_ids": inputs("llama")["input_ids"][:1]}  # PEFT's CorDA hook reads one sequence a call
    theirs, expected = copy.deepcopy(base), run(base, batch)
    pk.attach(base, pk.LoraConfig(r=4, alpha=8, targets=QV, init="corda"))
    pk.initialize(base, [batch])
    from peft.tuners.lora.corda import preprocess_corda
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="corda",
                          corda_config=peft.tuners.lora.config.CordaConfig(corda_method="ipm"))
    preprocess_corda(theirs, cfg, run_model=lambda: run(theirs, batch))
    p = peft.get_peft_model(theirs, cfg)
    for path, w in wrappers(base).items():
        layer = peft_layers(p)[path]
        close(w.scaling * w.lora_B @ w.lora_A,
              w.scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight, tol=1e-4)
    close(run(base, batch), expected)


def test_corda_factors_do_not_grow_with_the_tokens_seen():
    """B A is the same at any covariance scale, the split is not: CorDA's A and B must not
    depend on how many tokens the covariance summed (B grew as their square root: on
    SmolLM2 B was up to 11x PiSSA's after 8 short texts, and training collapsed), and each
    rank's norm is shared evenly between them, as PiSSA's."""
    batch = {"input_ids": inputs("llama")["input_ids"]}
    once, twice = llama(), llama()
    for model, seen in ((once, [batch]), (twice, [batch, batch])):
        pk.attach(model, pk.LoraConfig(r=4, alpha=8, targets=QV, init="corda"))
        pk.initialize(model, seen)
    for (path, a), b in zip(wrappers(once).items(), wrappers(twice).values()):
        close(a.lora_A, b.lora_A, tol=1e-4)
        close(a.lora_B, b.lora_B, tol=1e-4)
        close(a.lora_A.norm(dim=1), a.lora_B.norm(dim=0), tol=1e-4)  # each rank split evenly


def test_lora_ga_starts_from_the_gradient_svd():
    base, batch = llama(), inputs("llama")
    batch = {**batch, "labels": batch["input_ids"]}
    ref = copy.deepcopy(base)
    for n, q in ref.named_parameters():
        q.requires_grad_(n.endswith(tuple(f"{t}.weight" for t in QV)))
    ref(**batch).loss.backward()
    grads = {n.removesuffix(".weight"): q.grad for n, q in ref.named_parameters() if q.grad is not None}
    expected = run(base, batch)
    pk.attach(base, pk.LoraConfig(r=2, alpha=4, targets=QV, init="lora-ga"))
    with pytest.raises(pk.ConfigError, match="labels"):
        pk.initialize(base, [inputs("llama")])
    pk.initialize(base, [batch])
    assert all(q.grad is None for q in base.parameters())
    for path, w in wrappers(base).items():
        u, s, vh = torch.linalg.svd(grads[path].double())
        close((w.lora_A.double() @ vh[:2].T).abs(), torch.eye(2, dtype=torch.float64), tol=1e-3)
        factor = w.lora_B.shape[0] ** 0.25 / 4.0
        close((w.lora_B.double().T @ u[:, 2:4]).abs(), torch.diag(s[2:4]) * factor, tol=1e-4)
    torch.testing.assert_close(run(base, batch), expected, rtol=0, atol=0)


def test_bad_init_names_the_choices():
    with pytest.raises(pk.ConfigError, match="--method.init must be one of"):
        pk.LoraConfig(init="pisa")
    with pytest.raises(pk.ConfigError, match="--method.init must be one of"):
        pk.LoraConfig(init="pissa_niter_0")


@pytest.mark.parametrize("init", ["eva", "lora-ga"])
def test_train_runs_the_data_driven_init_on_its_first_batches(init):
    model = llama()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "attention_mask": [1] * 6, "labels": ids}
            for ids in torch.randint(3, 60, (8, 6), generator=g).tolist()]
    pk.attach(model, pk.LoraConfig(r=2, targets=QV, init=init))
    assert pending(model)
    pk.train(model, rows, pk.TrainConfig(lr=1e-3, max_steps=1, batch_size=4, progress=False))
    assert not pending(model)
    assert all(w.lora_B.any() for w in wrappers(model).values())  # trained a step from its init


def test_a_loaded_data_driven_adapter_is_not_initialised_again(tmp_path):
    model, batch = llama(), inputs("llama")
    fresh = copy.deepcopy(model)
    pk.attach(model, pk.LoraConfig(r=2, targets=QV, init="eva"))
    pk.initialize(model, [batch])
    pk.save_adapter(model, tmp_path / "a")
    pk.load_adapter(fresh, tmp_path / "a")
    assert not pending(fresh, "default")  # pk.train leaves its values alone


@pytest.mark.parametrize("init", ["eva", "corda", "lora-ga"])
def test_data_driven_inits_run_on_verbaliser_batches(init):
    """A verbaliser's batch holds class ids as labels: the inputs-only inits (EVA, CorDA) must not
    hand them to the language model's own token loss (they did: a batch-size error)."""
    model = llama()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "attention_mask": [1] * 6, "labels": i % 2}
            for i, ids in enumerate(torch.randint(3, 60, (8, 6), generator=g).tolist())]
    pk.attach(model, pk.LoraConfig(r=2, targets=QV, init=init))
    pk.train(model, rows, pk.TrainConfig(lr=1e-3, max_steps=1, batch_size=4, progress=False,
                                         label_token_ids=[5, 6]))
    assert not pending(model)
