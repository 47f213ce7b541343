"""The DINO loss: cross-entropy between centred, sharpened teacher outputs and student outputs."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _float32(ref: torch.Tensor) -> torch.autocast:
    """A region where autocast is off on ``ref``'s device: operations run in their inputs' dtype."""
    return torch.autocast(device_type=ref.device.type, enabled=False)


#: Teacher-target methods of :class:`DINOLoss`.
CENTERINGS = ("center", "sinkhorn_knopp")


class DINOLoss(nn.Module):
    """DINO loss (Caron et al., ICCV 2021), with the interface of nidl's ``DINOLoss``.

    For teacher outputs ``t_i`` (the global views) and student outputs ``s_j`` (all views), the
    loss is the mean over all pairs ``(i, j)`` with ``i != j`` of the batch-mean cross-entropy::

        -sum_k softmax((t_i - center) / T_t)_k * log_softmax(s_j / T_s)_k

    The teacher temperature ``T_t`` warms up linearly over the first ``warmup_teacher_temp_epochs``
    epochs. ``center`` is an exponential moving average of the teacher outputs: it is used in the
    loss before being updated with the current batch.

    Precision: the centring, both softmaxes, the contraction and the centre run in float32 with
    autocast disabled, whatever the autocast dtype of the caller (bf16 logits divided by a
    teacher temperature of 0.01 change the teacher's top prototype for about 1 % of samples).
    The centre buffer stays float32.

    Args:
        output_dim: K, the number of prototypes (the projection head's ``output_dim``).
        warmup_teacher_temp: teacher temperature at epoch 0.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: number of epochs of the linear warm-up (0: none).
        student_temp: student temperature.
        center_momentum: EMA coefficient of the centre.
        centering: how the teacher's targets are made from its outputs (an addition to nidl's
            interface, keyword only): ``"center"`` (DINO: subtract the EMA centre, then a
            sharpened softmax) or ``"sinkhorn_knopp"`` (SwAV's and DINOv2's: the batch's targets
            are rescaled by Sinkhorn-Knopp iterations so that every prototype gets the same
            share of the batch, Caron et al. NeurIPS 2020; Oquab et al. TMLR 2024). The centre
            is still updated (the collapse monitors read it) but does not enter the targets.
        sinkhorn_iterations: Sinkhorn-Knopp iterations (DINOv2 uses 3).

    Attributes:
        center: buffer of shape (1, 1, K), zeros at construction.
        teacher_temp_schedule: 1-D tensor of length ``warmup_teacher_temp_epochs``, linear from
            ``warmup_teacher_temp`` to ``teacher_temp`` (``torch.linspace``).

    Example:
        >>> loss_fn = DINOLoss(output_dim=16, warmup_teacher_temp_epochs=2)
        >>> teacher, student = torch.randn(2, 4, 16), torch.randn(6, 4, 16)
        >>> loss = loss_fn(teacher, student, epoch=0)  # scalar; the centre moves once
    """

    def __init__(
        self,
        output_dim: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        *,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"DINOLoss: centering must be one of {CENTERINGS}, got {centering!r}")
        if int(sinkhorn_iterations) < 1:
            raise ValueError(
                f"DINOLoss: sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}"
            )
        if int(output_dim) < 1:
            raise ValueError(f"DINOLoss: output_dim must be >= 1, got {output_dim}")
        if int(warmup_teacher_temp_epochs) < 0:
            raise ValueError(
                f"DINOLoss: warmup_teacher_temp_epochs must be >= 0, got {warmup_teacher_temp_epochs}"
            )
        for name, value in (
            ("warmup_teacher_temp", warmup_teacher_temp),
            ("teacher_temp", teacher_temp),
            ("student_temp", student_temp),
        ):
            if not value > 0:
                raise ValueError(f"DINOLoss: {name} must be > 0, got {value}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss: center_momentum must be in [0, 1], got {center_momentum}")
        self.output_dim = int(output_dim)
        self.warmup_teacher_temp = float(warmup_teacher_temp)
        self.teacher_temp = float(teacher_temp)
        self.warmup_teacher_temp_epochs = int(warmup_teacher_temp_epochs)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, 1, self.output_dim))
        self.teacher_temp_schedule = torch.linspace(
            self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs
        )

    def teacher_temperature(self, epoch: int | None = None) -> float:
        """Teacher temperature at ``epoch`` (None: the final temperature)."""
        if epoch is not None and 0 <= epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return self.teacher_temp

    def forward(
        self,
        teacher_out: torch.Tensor,
        student_out: torch.Tensor,
        epoch: int | None = None,
        update_center: bool = True,
    ) -> torch.Tensor:
        """Compute the loss, then update the centre with ``teacher_out``.

        Args:
            teacher_out: (n_global_views, B, K) teacher head outputs.
            student_out: (n_views, B, K) student head outputs; the first n_global_views views are
                the teacher's views, in the same order.
            epoch: current epoch for the teacher-temperature warm-up; None means ``teacher_temp``.
            update_center: set False to leave the centre untouched (used by validation; an
                addition to nidl's interface).

        Returns:
            The scalar loss.

        Raises:
            ValueError: if the shapes are inconsistent.
        """
        if teacher_out.ndim != 3 or student_out.ndim != 3:
            raise ValueError(
                "DINOLoss expects teacher_out (n_global_views, B, K) and student_out "
                f"(n_views, B, K), got {tuple(teacher_out.shape)} and {tuple(student_out.shape)}"
            )
        n_global, batch, k = teacher_out.shape
        if student_out.shape[1:] != (batch, k) or student_out.shape[0] < n_global:
            raise ValueError(
                f"DINOLoss: student_out {tuple(student_out.shape)} does not match teacher_out "
                f"{tuple(teacher_out.shape)}: it needs the same B and K and at least the "
                "teacher's global views first"
            )
        if k != self.output_dim:
            raise ValueError(f"DINOLoss: expected K={self.output_dim} outputs, got {k}")
        n_views = student_out.shape[0]
        if n_views * n_global - n_global < 1:
            raise ValueError("DINOLoss needs at least one (teacher, student) pair with i != j")

        with _float32(student_out):
            teacher_probs = self.teacher_probs(teacher_out, epoch)
            student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
            # cross[i, j] = mean over the batch of -sum_k p_t(i) log p_s(j), an fp32 contraction
            cross = -torch.einsum("ibk,jbk->ij", teacher_probs, student_logp) / batch
            # mean over the pairs i != j: all pairs minus the diagonal (fixed shapes, no
            # masked_select, whose data-dependent output shape syncs with the host)
            n_pairs = n_global * n_views - n_global
            loss = (cross.sum() - cross.diagonal().sum()) / n_pairs
        if update_center:
            self.update_center(teacher_out)
        return loss

    def teacher_probs(self, teacher_out: torch.Tensor, epoch: int | None = None) -> torch.Tensor:
        """The teacher's targets: ``softmax((teacher_out - center) / T_t(epoch))``, no gradient.

        Computed in float32 whatever the autocast dtype: the temperatures sharpen the logits by
        10-100x, which half precision does not represent well.

        Args:
            teacher_out: (..., K) teacher head outputs.
            epoch: current epoch for the temperature warm-up; None means ``teacher_temp``.

        Returns:
            Probabilities of the same shape, float32.
        """
        temp = self.teacher_temperature(epoch)
        with _float32(teacher_out):
            if self.centering == "sinkhorn_knopp":
                return self._sinkhorn_knopp(teacher_out.detach().float() / temp)
            centred = teacher_out.detach().float() - self.center.float()
            return F.softmax(centred / temp, dim=-1)

    def _sinkhorn_knopp(self, logits: torch.Tensor) -> torch.Tensor:
        """Targets whose prototypes share the batch equally and whose rows sum to 1.

        In the log domain (teacher temperatures of 0.01 overflow ``exp``): alternately make
        every prototype's total mass 1/K and every sample's 1/N, over the samples of all
        processes under ``torch.distributed``; then rescale the rows to sum to 1.
        """
        shape = logits.shape
        log_q = logits.reshape(-1, shape[-1])  # (N, K)
        n_local, k = log_q.shape
        n_total = torch.tensor(float(n_local), device=log_q.device)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(n_total)
        log_q = log_q - _global_logsumexp(log_q.flatten(), 0, distributed)
        log_k = torch.log(torch.tensor(float(k), device=log_q.device))
        for _ in range(self.sinkhorn_iterations):
            # each prototype (column) to a total of 1/K, over every process's samples
            log_q = log_q - _global_logsumexp(log_q, 0, distributed) - log_k
            # each sample (row) to 1/N
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - torch.log(n_total)
        return (log_q + torch.log(n_total)).exp().reshape(shape)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA update of the centre with the mean teacher output over views and batch.

        Under ``torch.distributed`` the batch centre is averaged over processes (sum / world
        size), so every rank keeps the same centre.

        Args:
            teacher_out: (n_global_views, B, K) teacher head outputs.
        """
        with _float32(teacher_out):
            batch_center = teacher_out.detach().float().mean(dim=(0, 1), keepdim=True)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            batch_center = batch_center / dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, teacher_temp={self.warmup_teacher_temp}"
            f"->{self.teacher_temp} over {self.warmup_teacher_temp_epochs} epochs, "
            f"student_temp={self.student_temp}, center_momentum={self.center_momentum}"
        )


def _global_logsumexp(values: torch.Tensor, dim: int, distributed: bool) -> torch.Tensor:
    """logsumexp along ``dim`` over this process's values and, under torch.distributed, all
    processes' (the values along ``dim`` are samples, split across processes)."""
    if not distributed:
        return torch.logsumexp(values, dim=dim)
    top = values.amax(dim=dim).detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    total = (values - top.unsqueeze(dim)).exp().sum(dim=dim)
    dist.all_reduce(total)
    return top + total.log()


class PatchDistillationLoss(DINOLoss):
    """iBOT's masked-token self-distillation (Zhou et al., ICLR 2022), as DINOv2 uses it.

    The student sees a global view with some tokens (cells of the backbone's last feature map)
    masked out of its input; the teacher sees the same view unmasked. At each masked token the
    loss is the cross-entropy between the teacher's centred, sharpened token distribution and the
    student's; it is averaged over the masked tokens of each image, then over the images that
    have masked tokens (Oquab et al., TMLR 2024, sec. 4: "patch-level objective"). An addition to
    nidl's interface; the temperatures, their warm-up and the centring (or Sinkhorn-Knopp) are
    those of :class:`DINOLoss`, with a centre of its own, the EMA of the mean teacher token.

    On registered brains every scan has the same anatomy at a token's position, and a teacher
    that gives each position its own prototype (the same in every scan) makes the task trivial:
    the position in the view tells the target, the loss falls to 0 and teaches nothing (measured
    on the demo cohorts, benchmarks/README.md, session 16). With ``per_token_center`` each token
    position has a centre of its own, the EMA of the teacher's output at that position over the
    batch: what is common to every scan there is subtracted, and the sharpened target is what
    sets this scan apart from the others at that place. An addition of this project (the
    centre of DINO, Caron et al. 2021, kept per position), not in iBOT or DINOv2.

    Args:
        Those of :class:`DINOLoss`, and
        per_token_center: one centre per token position (keyword only; needs
            ``centering="center"``). The centre then has shape (1, 1, L, K), set at the first
            update from the token count L, and L must not change afterwards.

    Example:
        >>> loss_fn = PatchDistillationLoss(output_dim=16, warmup_teacher_temp_epochs=0)
        >>> t, s = torch.randn(2, 4, 27, 16), torch.randn(2, 4, 27, 16)
        >>> masks = torch.rand(2, 4, 27) < 0.3
        >>> loss = loss_fn(t, s, masks)  # scalar; the centre moves once
    """

    def __init__(self, *args: Any, per_token_center: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if per_token_center and self.centering != "center":
            raise ValueError(
                "PatchDistillationLoss: per_token_center needs centering='center', "
                f"got {self.centering!r}"
            )
        self.per_token_center = bool(per_token_center)

    def forward(  # type: ignore[override]
        self,
        teacher_tokens: torch.Tensor,
        student_tokens: torch.Tensor,
        masks: torch.Tensor,
        epoch: int | None = None,
        update_center: bool = True,
    ) -> torch.Tensor:
        """Compute the loss over the masked tokens, then update the centre.

        Args:
            teacher_tokens: (n_global_views, B, L, K) teacher token outputs (unmasked views).
            student_tokens: (n_global_views, B, L, K) student token outputs (masked views).
            masks: (n_global_views, B, L) bool, True where the student's token was masked.
            epoch: current epoch for the teacher-temperature warm-up.
            update_center: set False to leave the centre untouched.

        Returns:
            The scalar loss; 0 (still attached to the student's graph) when nothing is masked.

        Raises:
            ValueError: if the shapes are inconsistent.
        """
        if (
            teacher_tokens.ndim != 4
            or teacher_tokens.shape != student_tokens.shape
            or masks.shape != teacher_tokens.shape[:3]
        ):
            raise ValueError(
                "PatchDistillationLoss expects teacher and student tokens (V, B, L, K) of one "
                f"shape and masks (V, B, L), got {tuple(teacher_tokens.shape)}, "
                f"{tuple(student_tokens.shape)} and {tuple(masks.shape)}"
            )
        if teacher_tokens.shape[-1] != self.output_dim:
            raise ValueError(
                f"PatchDistillationLoss: expected K={self.output_dim} outputs, "
                f"got {teacher_tokens.shape[-1]}"
            )
        with _float32(student_tokens):
            teacher_probs = self.teacher_probs(teacher_tokens, epoch)
            student_logp = F.log_softmax(student_tokens.float() / self.student_temp, dim=-1)
            cross = -(teacher_probs * student_logp).sum(-1)  # (V, B, L)
            weights = masks.float()
            per_image = weights.sum(-1)  # masked tokens of each image
            # each image's masked tokens weigh 1 / (its count), each masked image 1 / (their count)
            weights = weights / per_image.clamp_min(1.0).unsqueeze(-1)
            n_images = (per_image > 0).sum().clamp_min(1)
            loss = (cross * weights).sum() / n_images
        if update_center:
            self.update_center(teacher_tokens)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA update of the centre with the mean teacher token over every view, image and token
        (``per_token_center``: over every view and image, one centre per token position)."""
        if not self.per_token_center:
            super().update_center(teacher_out.reshape(1, -1, teacher_out.shape[-1]))
            return
        shape = (1, 1, *teacher_out.shape[2:])
        if tuple(self.center.shape) != shape:
            if self.center.ndim == 4:
                raise ValueError(
                    f"PatchDistillationLoss: {teacher_out.shape[2]} tokens, but the per-token "
                    f"centre was set for {self.center.shape[2]}: keep the view size and encoder"
                )
            self.center = self.center.new_zeros(shape)  # the first update: zeros, then the EMA
        super().update_center(teacher_out)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # a per-token centre is sized at the first update: take the saved one's shape
        saved = state_dict.get(prefix + "center")
        if saved is not None and tuple(saved.shape) != tuple(self.center.shape):
            self.center = self.center.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
