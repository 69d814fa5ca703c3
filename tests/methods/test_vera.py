"""VeRA numerics: h = W0 x + Λb B Λd A x with A, B shared, frozen, rebuilt from the key."""
import torch

import petkit as pk
from petkit.methods.vera import shared_projections
from toys import mlp, perturb


def test_forward_is_the_scaled_random_projection_closed_form():
    m = mlp()
    w1, b1 = m.fc1.weight.detach().clone(), m.fc1.bias.detach().clone()
    pk.attach(m, pk.VeraConfig(r=4, targets=["fc1", "fc2"], projection_prng_key=3))
    a, b = shared_projections(4, 16, 16, 3)  # the largest (in, out) among fc1 (8->16), fc2 (16->16)
    w = m.fc1
    assert torch.equal(w.vera_A, a[:, :8]) and torch.equal(w.vera_B, b[:16])
    assert torch.equal(m.fc2.vera_A, a) and not w.vera_lambda_b.any()
    assert torch.equal(w.vera_lambda_d, torch.full((4,), 0.1))
    perturb(pk.trainable_parameters(m), scale=0.5)
    dw = (w.vera_lambda_b[:, None] * w.vera_B) @ (w.vera_lambda_d[:, None] * w.vera_A)
    x = torch.randn(3, 8)
    torch.testing.assert_close(w(x), (x @ (w1 + dw).T + b1).detach())
    torch.testing.assert_close(w.delta_weight(), dw.detach())


def test_only_the_scaling_vectors_train():
    m = mlp()
    pk.attach(m, pk.VeraConfig(r=4, targets=["fc1", "fc2"]))
    sizes = {n.rsplit(".", 1)[1]: p.numel() for n, p in pk.trainable_parameters(m).items() if n.startswith("fc1")}
    assert sizes == {"vera_lambda_b": 16, "vera_lambda_d": 4}
