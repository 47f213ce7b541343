"""iBOT's masked-token loss (PatchDistillationLoss) against the formula written here, and DINO's
masking and use of it."""

from __future__ import annotations

import math

import pytest
import torch

from nidl_dino.core.loss import PatchDistillationLoss
from nidl_dino.encoders.networks import SmallCNN, build_encoder


def _by_hand(teacher, student, masks, center, t_temp, s_temp):
    """Mean over masked images of the mean over their masked tokens of the cross-entropy;
    ``center`` a scalar, or (L, K): one centre per token position."""
    per_image = []
    for v in range(teacher.shape[0]):
        for b in range(teacher.shape[1]):
            terms = []
            for token in range(teacher.shape[2]):
                if not masks[v, b, token]:
                    continue
                c = center[token] if torch.is_tensor(center) and center.ndim == 2 else center
                p = torch.softmax((teacher[v, b, token] - c) / t_temp, dim=-1)
                q = torch.log_softmax(student[v, b, token] / s_temp, dim=-1)
                terms.append(-(p * q).sum().item())
            if terms:
                per_image.append(sum(terms) / len(terms))
    return sum(per_image) / len(per_image)


def test_patch_loss_matches_the_formula_and_moves_its_centre():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 3, 8, 5, generator=g), torch.randn(2, 3, 8, 5, generator=g)
    masks = torch.zeros(2, 3, 8, dtype=torch.bool)
    masks[0, 0, [1, 4]] = True
    masks[1, 2, [0, 2, 3, 7]] = True
    masks[0, 1, 5] = True
    loss_fn = PatchDistillationLoss(5, warmup_teacher_temp_epochs=0, teacher_temp=0.5)
    loss_fn.center.fill_(0.3)
    expected = _by_hand(teacher, student, masks, 0.3, 0.5, 0.1)
    assert float(loss_fn(teacher, student, masks)) == pytest.approx(expected, rel=1e-5)
    # the centre: EMA (0.9) of the mean teacher token over views, images and tokens
    new_center = 0.9 * 0.3 + 0.1 * teacher.reshape(-1, 5).mean(0)
    torch.testing.assert_close(loss_fn.center.view(5), new_center)


def test_patch_loss_is_zero_but_attached_when_nothing_is_masked():
    student = torch.randn(2, 2, 4, 3, requires_grad=True)
    loss = PatchDistillationLoss(3)(torch.randn(2, 2, 4, 3), student, torch.zeros(2, 2, 4).bool())
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert student.grad is not None


def test_patch_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="tokens"):
        PatchDistillationLoss(3)(
            torch.randn(2, 2, 4, 3), torch.randn(2, 2, 5, 3), torch.ones(2, 2, 4)
        )


def _dino(**options):
    from dino_fixtures import tiny_dino

    torch.manual_seed(0)
    enc = SmallCNN(channels=(4, 8))
    return tiny_dino(enc, 1, **{"max_epochs": 1, **options})


def test_masks_follow_the_probability_and_ratio():
    model = _dino(patch_loss_weight=1.0, mask_ratio=(0.2, 0.4), mask_probability=0.5)
    torch.manual_seed(0)
    masks = model.draw_masks(2, 2000, 27, torch.device("cpu"))
    counts = masks.sum(-1).flatten()
    masked = counts > 0
    assert abs(masked.float().mean().item() - 0.5) < 0.04
    # round(r * 27) for r uniform in [0.2, 0.4]: 5 to 11 tokens, mean about 0.3 * 27
    assert counts[masked].min() >= 5 and counts[masked].max() <= 11
    assert abs(counts[masked].float().mean().item() - 8.1) < 0.3


def test_mask_views_zeroes_exactly_the_masked_cells():
    views = torch.ones(1, 1, 8, 8, 8)
    masks = torch.zeros(1, 8, dtype=torch.bool)
    masks[0, 5] = True  # cell (1, 0, 1) of a 2 x 2 x 2 grid: voxels [4:8, 0:4, 4:8]
    out = _dino(patch_loss_weight=1.0).mask_views(views, masks, (2, 2, 2))
    expected = torch.ones(1, 1, 8, 8, 8)
    expected[:, :, 4:8, 0:4, 4:8] = 0
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["small_cnn", "resnet10"])
def test_tokens_pool_to_the_encoders_own_features(name):
    from nidl_dino.core.estimator import _pooled_and_tokens

    kwargs = {"channels": [4, 8]} if name == "small_cnn" else {}
    enc = build_encoder({"name": name, "kwargs": kwargs}, image_size=[[16, 16, 16]]).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    pooled, tokens, grid = _pooled_and_tokens(enc, x)
    torch.testing.assert_close(pooled, enc(x))
    assert tokens.shape == (2, math.prod(grid), enc.output_dim)


def test_tokens_of_an_earlier_stage_are_its_cells_and_the_pool_stays_the_last_stages():
    from nidl_dino.core.estimator import _pooled_and_tokens

    torch.manual_seed(0)
    enc = SmallCNN(channels=(4, 8, 16)).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    maps = enc.stage_outputs(x)
    pooled, tokens, grid = _pooled_and_tokens(enc, x, stage=2)
    torch.testing.assert_close(pooled, enc(x))
    assert grid == (4, 4, 4) and tokens.shape == (2, 64, 8)
    # token l is the cell (l // 16, (l // 4) % 4, l % 4) of stage 2's map: row-major order
    torch.testing.assert_close(tokens[1, 1 * 16 + 2 * 4 + 3], maps[1][1, :, 1, 2, 3])
    _, last_tokens, last_grid = _pooled_and_tokens(enc, x, stage=0)
    assert last_grid == (2, 2, 2) and last_tokens.shape == (2, 8, 16)
    torch.testing.assert_close(last_tokens, _pooled_and_tokens(enc, x, stage=3)[1])


def test_dino_with_an_earlier_patch_stage_fits_on_that_stages_grid(tmp_path):
    from dino_fixtures import views_loader

    model = _dino(patch_loss_weight=1.0, patch_stage=1, max_epochs=1, num_sanity_val_steps=0)
    assert model.student_patch_head.mlp[0].in_features == 4  # stage 1 of channels (4, 8)
    assert model.student.training  # the construction's dry pass left the mode as it was
    batch = next(iter(views_loader(batch_size=4, n=4, n_local=1, global_size=16, local_size=8)))
    _, t_tokens, grid = model._teacher_tokens_pass(batch)
    assert grid == (8, 8, 8) and t_tokens.shape[:3] == (2, 4, 512)
    before = [p.clone() for p in model.teacher_patch_head.parameters()]
    model.fit(views_loader(batch_size=4, n=8, n_local=1, global_size=16, local_size=8))
    after = list(model.teacher_patch_head.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_a_patch_stage_the_encoder_lacks_is_a_one_line_error():
    from nidl_dino.errors import UserError

    with pytest.raises(UserError, match="patch_stage: 5 but the encoder has 2 stages"):
        _dino(patch_loss_weight=1.0, patch_stage=5)


def test_dino_adds_the_weighted_patch_term_and_its_teacher_follows_the_ema():
    from dino_fixtures import views_loader

    batch = next(iter(views_loader(batch_size=4, n=4, n_local=1, global_size=16, local_size=8)))
    model = _dino(patch_loss_weight=0.5, mask_probability=1.0)
    model.log = lambda *a, **k: None  # no trainer attached
    model.log_dict = lambda *a, **k: None
    torch.manual_seed(1)
    out = model.training_step(batch, 0)
    # the same step by hand, with the same masks
    fresh = _dino(patch_loss_weight=0.5, mask_probability=1.0)
    z_t, t_tokens, grid = fresh._teacher_tokens_pass(batch)
    torch.manual_seed(1)
    masks = fresh.draw_masks(2, 4, math.prod(grid), torch.device("cpu"))
    assert masks.any(-1).all()  # probability 1: every view masked
    z_s, _, s_tokens = fresh._student_tokens_pass(batch, masks, grid)
    expected = fresh.loss(z_t, z_s, epoch=0) + 0.5 * fresh.patch_loss(
        t_tokens, s_tokens, masks, epoch=0
    )
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5)
    # the patch heads take part in the optimiser's groups and in the EMA
    params = {id(p) for g in model.parameter_groups() for p in g["params"]}
    trainable = [p for p in model.student_patch_head.parameters() if p.requires_grad]
    assert trainable and all(id(p) in params for p in trainable)
    assert any(s is model.student_patch_head for s, _ in model._ema_pairs())


def test_dino_without_patch_loss_builds_no_patch_head():
    model = _dino()
    assert model.student_patch_head is None and model.patch_loss is None
    assert not any("patch" in k for k in model.state_dict())


def test_dino_fits_with_the_patch_loss(tmp_path):
    from dino_fixtures import views_loader

    model = _dino(patch_loss_weight=1.0, max_epochs=2, num_sanity_val_steps=0)
    before = [p.clone() for p in model.teacher_patch_head.parameters()]
    model.fit(views_loader(batch_size=4, n=8, n_local=1, global_size=16, local_size=8))
    after = list(model.teacher_patch_head.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert model.teacher(torch.randn(2, 1, 16, 16, 16)).shape == (2, 8)


def test_per_token_centre_matches_the_formula_and_keeps_one_centre_per_position():
    g = torch.Generator().manual_seed(2)
    loss_fn = PatchDistillationLoss(
        5, warmup_teacher_temp_epochs=0, teacher_temp=0.5, per_token_center=True
    )
    masks = torch.rand(2, 3, 8, generator=g) < 0.5
    masks[0, 0, 0] = True
    expected_center = torch.zeros(8, 5)
    for _ in range(3):
        teacher = torch.randn(2, 3, 8, 5, generator=g)
        student = torch.randn(2, 3, 8, 5, generator=g)
        expected = _by_hand(teacher, student, masks, expected_center.clone(), 0.5, 0.1)
        assert float(loss_fn(teacher, student, masks)) == pytest.approx(expected, rel=1e-5)
        # EMA (0.9) of the mean teacher output at each position, over views and images
        expected_center = 0.9 * expected_center + 0.1 * teacher.mean(dim=(0, 1))
        assert loss_fn.center.shape == (1, 1, 8, 5)
        torch.testing.assert_close(loss_fn.center.view(8, 5), expected_center)


def test_per_token_centre_turns_position_prototypes_into_scan_targets():
    # every scan has the same output at a position (its prototype) plus a small part of its own:
    # one global centre keeps the position's prototype as every scan's target, the per-position
    # centre removes it and leaves the scan's own part
    g = torch.Generator().manual_seed(3)
    n_scans, n_tokens, k = 64, 4, 16
    position = 8.0 * torch.eye(n_tokens, k)  # position l: prototype l
    own = 0.5 * torch.randn(1, n_scans, n_tokens, k, generator=g)
    teacher = position + own
    options = {"output_dim": k, "warmup_teacher_temp_epochs": 0, "teacher_temp": 0.05}
    per_token = PatchDistillationLoss(**options, per_token_center=True, center_momentum=0.0)
    per_token.update_center(teacher)  # momentum 0: the centre is this batch's mean
    global_centre = PatchDistillationLoss(**options, center_momentum=0.0)
    global_centre.update_center(teacher)
    scan_part = (own - own.mean(dim=(0, 1))).argmax(-1)
    assert torch.equal(per_token.teacher_probs(teacher).argmax(-1), scan_part)
    top = global_centre.teacher_probs(teacher).argmax(-1)  # (1, scans, tokens)
    assert torch.equal(top, torch.arange(n_tokens).expand_as(top))  # the position's, every scan


def test_per_token_centre_checks_its_token_count_and_loads_from_a_state_dict():
    loss_fn = PatchDistillationLoss(4, per_token_center=True)
    loss_fn.update_center(torch.randn(2, 3, 6, 4))
    with pytest.raises(ValueError, match="6"):
        loss_fn.update_center(torch.randn(2, 3, 5, 4))
    fresh = PatchDistillationLoss(4, per_token_center=True)
    fresh.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(fresh.center, loss_fn.center)
    with pytest.raises(ValueError, match="per_token_center"):
        PatchDistillationLoss(4, per_token_center=True, centering="sinkhorn_knopp")


def test_dino_fits_with_per_token_centring_and_reloads(tmp_path):
    from dino_fixtures import views_loader

    model = _dino(patch_loss_weight=1.0, patch_centering="per_token", max_epochs=1)
    model.fit(views_loader(batch_size=4, n=8, n_local=1, global_size=16, local_size=8))
    from nidl_dino.core.estimator import _pooled_and_tokens

    _, tokens, _ = _pooled_and_tokens(model.teacher, torch.randn(1, 1, 16, 16, 16))
    center = model.patch_loss.center  # one centre per token of a 16^3 global view
    assert center.shape == (1, 1, tokens.shape[1], model.loss.output_dim)
    assert center.abs().sum() > 0
    fresh = _dino(patch_loss_weight=1.0, patch_centering="per_token")
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.patch_loss.center, center)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"patch_centering": "local"}, "patch_centering"),
        ({"patch_loss_weight": -1.0}, "patch_loss_weight"),
        ({"mask_ratio": (0.5, 0.2)}, "mask_ratio"),
        ({"mask_probability": 0.0}, "mask_probability"),
        ({"patch_stage": -1}, "patch_stage"),
        ({"patch_stage": 1.5}, "patch_stage"),
    ],
)
def test_patch_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        _dino(**options)


def test_an_encoder_without_a_feature_map_gets_a_one_line_error():
    from nidl_dino.errors import UserError

    from dino_fixtures import TinyConv3d, tiny_dino, views_loader

    model = tiny_dino(TinyConv3d(dim=8), 1, patch_loss_weight=1.0)
    model.log = lambda *a, **k: None
    model.log_dict = lambda *a, **k: None
    batch = next(iter(views_loader(batch_size=2, n=2, n_local=1)))
    with pytest.raises(UserError, match="patch_loss_weight"):
        model.training_step(batch, 0)


def test_config_refuses_per_token_centring_with_sinkhorn_in_one_line():
    from pathlib import Path

    from nidl_dino.errors import UserError
    from nidl_dino.workflow.setup import check_config

    schema = Path(__file__).parents[2] / "nidl_dino" / "config.schema.yaml"
    ok = {"patch_centering": "per_token", "teacher_centering": "center"}
    check_config({"output_dir": "x", "dino": ok}, schema)
    check_config({"output_dir": "x", "dino": {"teacher_centering": "sinkhorn_knopp"}}, schema)
    bad = {"patch_centering": "per_token", "teacher_centering": "sinkhorn_knopp"}
    with pytest.raises(UserError) as err:
        check_config({"output_dir": "x", "dino": bad}, schema)
    message = str(err.value)
    assert "dino.teacher_centering" in message and "dino.patch_centering" in message
    assert "\n" not in message
