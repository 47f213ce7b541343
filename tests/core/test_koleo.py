"""KoLeo regulariser (nidl_dino.core.koleo) against the formula written here, and its use in DINO."""

from __future__ import annotations

import math

import pytest
import torch

from nidl_dino.core.koleo import koleo_loss


def _by_hand(x: torch.Tensor) -> float:
    rows = [row / row.norm() for row in x.double()]
    total = 0.0
    for i, xi in enumerate(rows):
        nearest = min(float((xi - xj).norm()) for j, xj in enumerate(rows) if j != i)
        total += -math.log(nearest + 1e-8)
    return total / len(rows)


def test_matches_the_nearest_neighbour_formula():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert float(koleo_loss(x)) == pytest.approx(_by_hand(x), rel=1e-5)


def test_spread_features_score_lower_than_clustered_ones_and_gradients_spread_them():
    spread = torch.eye(4)  # orthogonal: every neighbour at sqrt(2)
    assert float(koleo_loss(spread)) == pytest.approx(-math.log(math.sqrt(2)), rel=1e-6)
    clustered = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    assert float(koleo_loss(clustered)) > float(koleo_loss(spread))
    x = clustered.clone().requires_grad_(True)
    koleo_loss(x).backward()
    step = x.detach() - 0.01 * x.grad
    assert float(koleo_loss(step)) < float(koleo_loss(clustered))


def test_float32_under_bf16_autocast_and_bad_shapes():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = koleo_loss(x.bfloat16())
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(_by_hand(x.bfloat16().float()), rel=1e-4)
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 3))


def test_dino_adds_the_weighted_koleo_term():
    from nidl_dino import DINO

    from dino_fixtures import SMALL_HEAD, TinyConv3d, views_loader

    def build(weight):
        torch.manual_seed(0)
        return DINO(TinyConv3d, encoder_kwargs={"dim": 8}, **SMALL_HEAD, num_local_crops=2,
                    koleo_weight=weight, max_epochs=1, accelerator="cpu", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, random_state=0)  # fmt: skip

    batch = next(iter(views_loader(batch_size=4, n=4)))
    plain, regularised = build(0.0), build(0.5)
    regularised.load_state_dict(plain.state_dict())
    loss_plain = plain.loss(plain.forward_teacher(batch), plain.forward_student(batch), epoch=0)
    _, features = regularised._student_pass(batch)
    expected = loss_plain + 0.5 * torch.stack([koleo_loss(f) for f in features]).mean()
    regularised.log = lambda *a, **k: None  # no trainer attached
    regularised.log_dict = lambda *a, **k: None
    out = regularised.training_step(batch, 0)
    assert float(out["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    with pytest.raises(ValueError, match="koleo_weight"):
        build(-1.0)
