"""HRA numerics: h = W0 H x, H a product of Householder reflections (orthogonal)."""
import torch

import petkit as pk
from toys import mlp, perturb


def householder_chain(u):
    h = torch.eye(u.shape[0])
    for i in range(u.shape[1]):
        v = (u[:, i] / u[:, i].norm())[:, None]
        h = h - 2 * h @ v @ v.T
    return h


def test_init_is_the_identity_up_to_rounding():
    m = mlp()
    x = torch.randn(3, 16)
    expected = m.fc2(x)
    pk.attach(m, pk.HraConfig(r=4, targets=["fc2"]))
    u = m.fc2.hra_u
    assert torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 2], u[:, 3])
    torch.testing.assert_close(m.fc2(x), expected, rtol=0, atol=1e-6)


def test_forward_and_merge_are_the_reflection_chain():
    m = mlp()
    w0 = m.fc2.weight.detach().clone()
    pk.attach(m, pk.HraConfig(r=3, targets=["fc2"]))
    perturb(pk.trainable_parameters(m), scale=0.5)
    h = householder_chain(m.fc2.hra_u.detach())
    torch.testing.assert_close(h @ h.T, torch.eye(16), rtol=0, atol=1e-5)
    x = torch.randn(3, 16)
    torch.testing.assert_close(m.fc2(x), x @ (w0 @ h).T)
    pk.merge(m)
    torch.testing.assert_close(m.fc2.base.weight, w0 @ h)


def test_gram_schmidt_variant_is_one_reflection_of_the_orthonormalised_span():
    m = mlp()
    w0 = m.fc2.weight.detach().clone()
    pk.attach(m, pk.HraConfig(r=2, apply_gs=True, targets=["fc2"]))
    q, _ = torch.linalg.qr(m.fc2.hra_u.detach())
    h = torch.eye(16) - 2 * q @ q.T
    x = torch.randn(3, 16)
    torch.testing.assert_close(m.fc2(x), x @ (w0 @ h).T, rtol=1e-5, atol=1e-5)
