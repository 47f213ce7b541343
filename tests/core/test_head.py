"""DINOProjectionHead: structure, init statistics, weight norm, frozen last layer."""

import pytest
import torch
from torch import nn

from nidl_dino import DINOProjectionHead


def test_shapes_and_structure():
    head = DINOProjectionHead(input_dim=12, hidden_dim=20, bottleneck_dim=6, output_dim=30)
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 30)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 20), (20, 20), (20, 6)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.mlp) == 2
    no_bn = DINOProjectionHead(12, 20, 6, 30, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_bn.mlp)


def test_init_statistics():
    torch.manual_seed(0)
    head = DINOProjectionHead(input_dim=256, hidden_dim=512, bottleneck_dim=128, output_dim=64)
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
            # trunc_normal(std=0.02) truncated at +-2 (i.e. +-100 std): std ~0.02, mean ~0
            assert w.std().item() == pytest.approx(0.02, rel=0.05)
            assert abs(w.mean().item()) < 2e-3
            assert torch.count_nonzero(m.bias) == 0


def test_last_layer_weight_norm_is_one_and_frozen():
    head = DINOProjectionHead(8, 16, 4, 10, norm_last_layer=True)
    w = head.last_layer.weight.detach()  # effective weight g * v / ||v||, one row per prototype
    assert torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-5)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad
    free = DINOProjectionHead(8, 16, 4, 10, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    assert head.last_layer.bias is None


def test_output_is_last_layer_of_normalised_bottleneck():
    torch.manual_seed(3)
    head = DINOProjectionHead(8, 16, 4, 10, batch_norm=False).eval()
    x = torch.randn(3, 8)
    z = head.mlp(x)
    z = z / z.norm(dim=1, keepdim=True)
    expected = z @ head.last_layer.weight.T
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_input_dim_mismatch_is_a_clear_error():
    head = DINOProjectionHead(input_dim=8, hidden_dim=16, bottleneck_dim=4, output_dim=10)
    with pytest.raises(ValueError, match=r"\(B, 8\).*proj_input_dim"):
        head(torch.randn(2, 9))


def test_cancel_last_layer_gradients():
    head = DINOProjectionHead(8, 16, 4, 10, freeze_last_layer=2, norm_last_layer=False)
    for epoch, cancelled in [(0, True), (1, True), (2, False), (5, False)]:
        head.zero_grad(set_to_none=True)
        head(torch.randn(4, 8)).sum().backward()
        head.cancel_last_layer_gradients(epoch)
        grads = [p.grad for p in head.last_layer.parameters()]
        assert all(g is None for g in grads) is cancelled
        assert all(p.grad is not None for p in head.mlp.parameters())
    never = DINOProjectionHead(8, 16, 4, 10)  # default -1: never frozen
    never(torch.randn(4, 8)).sum().backward()
    never.cancel_last_layer_gradients(0)
    assert never.last_layer.parametrizations.weight.original1.grad is not None
