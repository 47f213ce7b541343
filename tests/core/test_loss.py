"""DINOLoss against the formulas written out here with plain loops."""

import math

import pytest
import torch

from nidl_dino import DINOLoss


def reference_loss(teacher, student, center, t_temp, s_temp):
    """Nested loop over (teacher view i, student view j != i), batch and prototypes."""
    n_g, batch, k = len(teacher), len(teacher[0]), len(teacher[0][0])
    total, pairs = 0.0, 0
    for i in range(n_g):
        for j in range(len(student)):
            if i == j:
                continue
            pair = 0.0
            for b in range(batch):
                t = [(teacher[i][b][c] - center[0][0][c]) / t_temp for c in range(k)]
                t_max = max(t)
                t_exp = [math.exp(v - t_max) for v in t]
                p = [e / sum(t_exp) for e in t_exp]
                s = [student[j][b][c] / s_temp for c in range(k)]
                s_max = max(s)
                log_z = s_max + math.log(sum(math.exp(v - s_max) for v in s))
                pair += -sum(p[c] * (s[c] - log_z) for c in range(k))
            total += pair / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_views", [2, 3, 6])
def test_loss_matches_nested_loop(n_views):
    torch.manual_seed(0)
    k = 7
    loss_fn = DINOLoss(k, warmup_teacher_temp_epochs=0, teacher_temp=0.05, student_temp=0.2)
    loss_fn.center.copy_(torch.randn(1, 1, k) * 0.3)
    teacher = torch.randn(2, 3, k).double()
    student = torch.randn(n_views, 3, k).double()
    center = loss_fn.center.clone().double()
    expected = reference_loss(teacher.tolist(), student.tolist(), center.tolist(), 0.05, 0.2)
    got = loss_fn(teacher, student)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_loss_uses_center_before_update_and_then_updates_it():
    torch.manual_seed(1)
    k, m = 5, 0.9
    loss_fn = DINOLoss(k, warmup_teacher_temp_epochs=0, center_momentum=m)
    c0 = torch.randn(1, 1, k)
    loss_fn.center.copy_(c0)
    teacher, student = torch.randn(2, 4, k), torch.randn(4, 4, k)
    expected = reference_loss(
        teacher.double().tolist(), student.double().tolist(), c0.double().tolist(), 0.07, 0.1
    )
    assert loss_fn(teacher, student).item() == pytest.approx(expected, rel=1e-5)
    # centre EMA by hand: c1[k] = m * c0[k] + (1 - m) * mean over views and batch of teacher[..., k]
    for c in range(k):
        batch_mean = sum(teacher[v, b, c].item() for v in range(2) for b in range(4)) / 8
        assert loss_fn.center[0, 0, c].item() == pytest.approx(
            m * c0[0, 0, c].item() + (1 - m) * batch_mean, abs=1e-6
        )


def test_update_center_twice_by_hand():
    loss_fn = DINOLoss(3, center_momentum=0.5)
    loss_fn.update_center(torch.ones(2, 2, 3))
    loss_fn.update_center(torch.full((2, 2, 3), 3.0))
    # c1 = 0.5 * 0 + 0.5 * 1 = 0.5; c2 = 0.5 * 0.5 + 0.5 * 3 = 1.75
    assert torch.allclose(loss_fn.center, torch.full((1, 1, 3), 1.75))
    assert loss_fn.center.shape == (1, 1, 3)
    assert "center" in loss_fn.state_dict()


def test_no_center_update_when_asked():
    loss_fn = DINOLoss(4)
    loss_fn(torch.randn(2, 2, 4), torch.randn(3, 2, 4), update_center=False)
    assert torch.count_nonzero(loss_fn.center) == 0


def test_teacher_temperature_schedule_values():
    loss_fn = DINOLoss(4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4)
    # linspace(0.04, 0.07, 4) = 0.04, 0.05, 0.06, 0.07
    assert loss_fn.teacher_temp_schedule.tolist() == pytest.approx([0.04, 0.05, 0.06, 0.07])
    assert [loss_fn.teacher_temperature(e) for e in range(6)] == pytest.approx(
        [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    )
    assert loss_fn.teacher_temperature(None) == pytest.approx(0.07)
    assert len(DINOLoss(4, warmup_teacher_temp_epochs=0).teacher_temp_schedule) == 0


def test_epoch_selects_temperature_in_loss():
    torch.manual_seed(2)
    loss_fn = DINOLoss(6, warmup_teacher_temp=0.02, teacher_temp=0.3, warmup_teacher_temp_epochs=3)
    teacher, student = torch.randn(2, 2, 6), torch.randn(2, 2, 6)
    zero = torch.zeros(1, 1, 6).tolist()
    # linspace(0.02, 0.3, 3)[1] = 0.16
    expected = reference_loss(teacher.double().tolist(), student.double().tolist(), zero, 0.16, 0.1)
    got = loss_fn(teacher, student, epoch=1, update_center=False)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    expected_final = reference_loss(
        teacher.double().tolist(), student.double().tolist(), zero, 0.3, 0.1
    )
    assert loss_fn(teacher, student, epoch=None).item() == pytest.approx(expected_final, rel=1e-5)


def test_loss_rejects_bad_shapes():
    loss_fn = DINOLoss(4)
    with pytest.raises(ValueError, match="K=4"):
        loss_fn(torch.randn(2, 2, 5), torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="same B"):
        loss_fn(torch.randn(2, 2, 4), torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="n_global_views"):
        loss_fn(torch.randn(2, 4), torch.randn(3, 2, 4))


def _sinkhorn_by_hand(scores, iterations):
    """SwAV's Sinkhorn-Knopp written plainly (float64): Q = exp(scores), columns then rows."""
    q = torch.exp(scores.double() - scores.double().max())
    q = q / q.sum()
    n, k = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True) / k
        q = q / q.sum(dim=1, keepdim=True) / n
    return q * n


def test_sinkhorn_knopp_targets_match_the_plain_algorithm_and_balance_prototypes():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 6, 5, generator=gen)
    loss_fn = DINOLoss(output_dim=5, warmup_teacher_temp_epochs=0, teacher_temp=0.5,
                       centering="sinkhorn_knopp", sinkhorn_iterations=3)  # fmt: skip
    targets = loss_fn.teacher_probs(teacher)
    expected = _sinkhorn_by_hand(teacher.reshape(-1, 5) / 0.5, 3).reshape(2, 6, 5)
    torch.testing.assert_close(targets.double(), expected, rtol=1e-5, atol=1e-7)
    rows = targets.reshape(-1, 5)
    torch.testing.assert_close(rows.sum(dim=1), torch.ones(12), rtol=1e-5, atol=1e-6)
    # many iterations: every prototype gets about the same share of the batch
    many = DINOLoss(output_dim=5, warmup_teacher_temp_epochs=0, teacher_temp=0.5,
                    centering="sinkhorn_knopp", sinkhorn_iterations=50)  # fmt: skip
    shares = many.teacher_probs(teacher).reshape(-1, 5).sum(dim=0) / 12
    torch.testing.assert_close(shares, torch.full((5,), 0.2), rtol=1e-3, atol=1e-4)


def test_sinkhorn_knopp_is_finite_at_sharp_temperatures_and_ignores_the_centre():
    teacher = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1)) * 5
    loss_fn = DINOLoss(output_dim=16, warmup_teacher_temp_epochs=0, teacher_temp=0.01,
                       centering="sinkhorn_knopp")  # fmt: skip
    before = loss_fn.teacher_probs(teacher)
    assert torch.isfinite(before).all()
    loss_fn.center.fill_(3.0)
    torch.testing.assert_close(loss_fn.teacher_probs(teacher), before)
    loss = loss_fn(teacher, torch.randn(4, 4, 16, generator=torch.Generator().manual_seed(2)))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(output_dim=4, centering="mean")
