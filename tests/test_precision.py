"""DINO's numbers under bf16 autocast on the CPU: fp32 where the formulas need it.

Under ``torch.autocast(dtype=torch.bfloat16)`` the head's MLP runs in bf16 (as the backbone
does), but the prototype layer, the centring, both softmaxes, the loss contraction and the centre
run in float32. The tests check that twice:

- exactly: given the same bf16-autocast bottleneck, the head's output, the loss, the targets and
  the gradients equal the formulas evaluated in float32 (the old code ran the prototype layer and
  the contraction in bf16: errors of ~1e-2 on the logits, far above these tolerances);
- end to end against a float32 run of the same weights, within tolerances stated here that bf16's
  8-bit mantissa in the MLP allows (measured on this CPU: logits max |err| 4.5e-3, loss rel
  6e-5, targets at T=0.04 max |err| 0.011 with no top prototype changed, gradient cosine
  0.9999 and norm ratio 0.998).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nidl_dino import DINO, DINOLoss, DINOProjectionHead
from nidl_dino.errors import UserError
from nidl_dino.workflow.layout import Layout
from nidl_dino.workflow.setup import check_config

from dino_fixtures import SMALL_HEAD, TinyConv3d, views_loader

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def make_head(seed: int = 0) -> DINOProjectionHead:
    torch.manual_seed(seed)
    return DINOProjectionHead(64, 128, 32, 256, batch_norm=False)


def loss_formula(teacher, student, center, t_temp, s_temp):
    """Mean over pairs i != j of the batch-mean cross-entropy, in float64, as a loop."""
    teacher, student, center = teacher.double(), student.double(), center.double()
    p = torch.softmax((teacher - center) / t_temp, dim=-1)
    logp = torch.log_softmax(student / s_temp, dim=-1)
    total, pairs = 0.0, 0
    for i in range(len(teacher)):
        for j in range(len(student)):
            if i != j:
                total = total + (-(p[i] * logp[j]).sum(-1)).mean()
                pairs += 1
    return total / pairs


def test_head_output_is_float32_prototype_layer_of_the_bf16_bottleneck():
    head = make_head()
    x = torch.randn(16, 64)
    with torch.autocast(**BF16):
        out = head(x)
        z = head.mlp(x)  # bf16 under autocast: the MLP follows the caller's precision
    assert z.dtype == torch.bfloat16
    assert out.dtype == torch.float32
    # formula: W z / |z| in float32 (W = g v / |v| row-wise, g = 1)
    v = head.last_layer.parametrizations.weight.original1.detach()
    w = v / v.norm(dim=1, keepdim=True)
    zf = z.float()
    expected = (zf / zf.norm(dim=1, keepdim=True)) @ w.T
    assert torch.allclose(out, expected, atol=2e-6)


def test_loss_and_targets_ignore_autocast_and_bf16_inputs():
    torch.manual_seed(1)
    k = 64
    loss_fn = DINOLoss(k, warmup_teacher_temp_epochs=0, teacher_temp=0.01, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, 1, k) * 0.1)
    teacher = torch.randn(2, 8, k).bfloat16()  # what a bf16 head would give
    student = torch.randn(5, 8, k).bfloat16()
    center = loss_fn.center.clone()
    with torch.autocast(**BF16):
        loss = loss_fn(teacher, student, update_center=False)
        targets = loss_fn.teacher_probs(teacher)
    assert loss.dtype == torch.float32 and targets.dtype == torch.float32
    expected = loss_formula(teacher.float(), student.float(), center, 0.01, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected_targets = torch.softmax((teacher.double() - center.double()) / 0.01, dim=-1)
    assert torch.allclose(targets.double(), expected_targets, atol=1e-6)
    # the centre is an fp32 EMA of the (upcast) teacher outputs
    with torch.autocast(**BF16):
        loss_fn.update_center(teacher)
    assert loss_fn.center.dtype == torch.float32
    batch_mean = teacher.double().mean(dim=(0, 1), keepdim=True)
    assert torch.allclose(loss_fn.center.double(), 0.9 * center.double() + 0.1 * batch_mean)


def test_gradients_under_autocast_equal_the_float32_formula():
    torch.manual_seed(2)
    k = 32
    loss_fn = DINOLoss(k, warmup_teacher_temp_epochs=0, teacher_temp=0.04, student_temp=0.1)
    teacher = torch.randn(2, 4, k)
    student = torch.randn(4, 4, k, requires_grad=True)
    with torch.autocast(**BF16):
        loss = loss_fn(teacher, student, update_center=False)
    loss.backward()  # outside autocast, as Lightning and torch's AMP recipe do
    # d loss / d s_j = sum_{i != j} (softmax(s_j / T_s) - p_i) / (T_s * B * n_pairs)
    p = torch.softmax(teacher.double() / 0.04, dim=-1)
    q = torch.softmax(student.detach().double() / 0.1, dim=-1)
    n_pairs = 2 * 4 - 2
    expected = torch.zeros_like(q)
    for j in range(4):
        for i in range(2):
            if i != j:
                expected[j] += (q[j] - p[i]) / (0.1 * 4 * n_pairs)
    assert student.grad.dtype == torch.float32
    assert torch.allclose(student.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_head_and_loss_within_tolerance_of_float32():
    head = make_head(3)
    x = torch.randn(2 * 16 + 4 * 16, 64)
    loss_fn = DINOLoss(256, warmup_teacher_temp_epochs=0, teacher_temp=0.04, student_temp=0.1)

    def run(autocast: bool):
        head.zero_grad(set_to_none=True)
        with torch.autocast(**BF16, enabled=autocast):
            out = head(x).view(6, 16, 256)
            teacher = out[:2].detach()
            loss = loss_fn(teacher, out, update_center=False)
            targets = loss_fn.teacher_probs(teacher)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None])
        return out.detach(), loss.item(), targets, grad

    out32, loss32, targets32, grad32 = run(False)
    out16, loss16, targets16, grad16 = run(True)
    assert out16.dtype == torch.float32
    assert (out16 - out32).abs().max() < 2e-2  # logits in [-1, 1]
    assert loss16 == pytest.approx(loss32, rel=5e-3)
    assert (targets16 - targets32).abs().max() < 0.15
    assert (targets16.argmax(-1) == targets32.argmax(-1)).float().mean() > 0.9
    cosine = F.cosine_similarity(grad16, grad32, dim=0).item()
    assert cosine > 0.99
    assert (grad16.norm() / grad32.norm()).item() == pytest.approx(1.0, abs=0.05)
    assert math.isfinite(loss16)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_training_keeps_teacher_and_centre_float32_or_refuses(precision, quiet_trainer_kwargs):
    model = DINO(
        TinyConv3d,
        encoder_kwargs={"dim": 8},
        num_local_crops=2,
        max_epochs=1,
        precision=precision,
        **SMALL_HEAD,
        **quiet_trainer_kwargs,
    )
    if precision.endswith("-true"):
        with pytest.raises(ValueError, match="bf16-true.*EMA update stalls"):
            model.fit(views_loader(n=8))
        return
    model.fit(views_loader(n=8))
    teacher = [*model.teacher.parameters(), *model.teacher_head.parameters(), model.loss.center]
    assert {t.dtype for t in teacher} == {torch.float32}
    assert torch.count_nonzero(model.loss.center) > 0


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_schema_refuses_half_true_precisions_in_one_line(precision, tmp_path):
    schema = Path(__file__).parents[1] / "nidl_dino" / "config.schema.yaml"
    check_config({"output_dir": "x", "trainer": {"precision": "bf16-mixed"}}, schema)
    with pytest.raises(UserError) as err:
        check_config({"output_dir": "x", "trainer": {"precision": precision}}, schema)
    assert "trainer.precision" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="extract.precision"):
        check_config({"output_dir": "x", "extract": {"precision": precision}}, schema)


@pytest.mark.parametrize(
    "extract, expected", [({}, "32-true"), ({"precision": "bf16-mixed"}, "bf16-mixed")]
)
def test_extraction_runs_float32_unless_asked_whatever_training_used(
    extract, expected, tmp_path, monkeypatch
):
    import numpy as np
    import pandas as pd

    from nidl_dino.features import extract as features

    seen = {}

    def fake_extract(encoders, paths, **kwargs):
        seen.update(kwargs)
        return {name: np.zeros((len(paths), 3), dtype=np.float32) for name in encoders}

    monkeypatch.setattr(features, "extract_feature_sets", fake_extract)
    monkeypatch.setattr(
        features, "load_teacher", lambda path: (torch.nn.Identity(), {"model_id": "m"})
    )
    monkeypatch.setattr(
        "nidl_dino.encoders.readout.feature_encoder", lambda encoder, pooling: encoder
    )
    qc = pd.DataFrame(
        {"scan_id": ["sub-01"], "participant_id": ["sub-01"], "session_id": [""], "status": ["ok"]}
    )
    config = {"extract": extract, "trainer": {"accelerator": "cpu", "precision": "bf16-mixed"}}
    features.extract_cohort("teacher.pt", qc, Layout(tmp_path), tmp_path / "manifest.tsv", config)
    assert seen["precision"] == expected and seen["accelerator"] == "cpu"


@pytest.mark.parametrize("inference_precision", [None, "bf16-mixed"])
def test_transform_runs_float32_after_bf16_training_unless_asked(
    inference_precision, quiet_trainer_kwargs
):
    extra = {"inference_precision": inference_precision} if inference_precision else {}
    model = DINO(
        TinyConv3d,
        encoder_kwargs={"dim": 8},
        num_local_crops=2,
        max_epochs=1,
        precision="bf16-mixed",
        **extra,
        **SMALL_HEAD,
        **quiet_trainer_kwargs,
    )
    model.fit(views_loader(n=8))
    volumes = torch.randn(4, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    features = model.transform(torch.utils.data.DataLoader(volumes, batch_size=2))
    model.teacher.eval()
    with torch.no_grad():
        expected = model.teacher(volumes)  # float32, no autocast
    if inference_precision is None:
        assert torch.allclose(features, expected, atol=1e-6)
    else:
        assert not torch.allclose(features.float(), expected, atol=1e-6)
        assert torch.allclose(features.float(), expected, rtol=0.05, atol=0.05)
