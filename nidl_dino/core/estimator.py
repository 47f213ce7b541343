"""The DINO estimator: student/teacher self-distillation on Lightning, with nidl's interface."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from nidl_dino.core.base import BaseEstimator, TransformerMixin
from nidl_dino.core.head import DINOProjectionHead
from nidl_dino.core.koleo import koleo_loss
from nidl_dino.core.loss import DINOLoss, PatchDistillationLoss
from nidl_dino.core.schedules import WarmupCosineLR, cosine_schedule
from nidl_dino.encoders.readout import stage_outputs
from nidl_dino.errors import UserError
from nidl_dino.importing import import_object, import_path_of, is_import_path

_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
_DEFAULT_LR_SCHEDULER_KWARGS = {
    "warmup_epochs": 10,
    "warmup_start_lr": 1e-6,
    "min_lr": 0.0,
    "interval": "step",
}
_NUM_GLOBAL_VIEWS = 2
#: Centrings of the patch loss's teacher tokens (``DINO(patch_centering=...)``).
PATCH_CENTERINGS = ("global", "per_token")
_FULL_PRECISION = (torch.float32, torch.float64)


class DINO(TransformerMixin, BaseEstimator):
    """DINO: self-distillation with no labels (Caron et al., ICCV 2021), nidl's API.

    A student (backbone + :class:`DINOProjectionHead`) sees 2 global and ``num_local_crops``
    local views of each sample; the teacher, an exponential moving average (EMA) of the student,
    sees the 2 global views; :class:`DINOLoss` is the cross-entropy between the centred,
    sharpened teacher outputs and the student outputs over all (teacher view, student view)
    pairs of different views. After training, the teacher backbone (no head) encodes the data.

    Numerics follow the original DINO: the teacher momentum follows a cosine from
    ``base_lambda`` to ``final_lambda`` over the run's optimizer steps and is applied once per
    optimizer step (also under gradient accumulation); the teacher temperature warms up linearly
    per epoch; the learning rate warms up linearly then follows a cosine, stepped per optimizer
    step; biases and normalisation parameters get no weight decay; the student backbone runs once
    per view resolution and the head once on all views.

    Where nidl 0.0.2 departs from the original DINO, this class follows the original:

    - validation (and Lightning's sanity check) computes the loss but never moves the centre,
      the momentum or any other training state;
    - ``num_local_crops=0`` works (the two global views only);
    - the whole training state (centre, momentum position, optimizer, LR schedule, epoch and
      step) lives in the Lightning checkpoint: the centre is a buffer of the loss, the momentum
      and learning rate are closed forms of the global step, so a run resumed with
      ``fit(..., ckpt_path=...)`` ends where the uninterrupted one does;
    - ``clip_grad`` clips each parameter's gradient norm as the original does, in Lightning's
      ``configure_gradient_clipping`` hook, i.e. on unscaled gradients under mixed precision;
    - ``fit`` works with ``save_hparams=False``; ``random_state`` seeds the weight
      initialisation and the data order, and None means no reseeding.

    Args:
        encoder: the backbone, an ``nn.Module`` class (built with ``encoder_kwargs``) or an
            instance (deep-copied for the teacher). It maps a view (B, C, D, H, W) to (B, F).
        encoder_kwargs: options for building the encoder; ignored for an instance.
        proj_input_dim: projector input dimension, the encoder's output dimension F.
        proj_hidden_dim: projector hidden dimension.
        proj_bottleneck_dim: projector bottleneck dimension.
        proj_output_dim: projector output dimension K (number of prototypes).
        proj_batch_norm: batch norm in the projector (set False for a ViT backbone).
        proj_norm_last_layer: weight-normalise the projector's last layer with its norm fixed.
        num_local_crops: number of local views per sample (0 allowed).
        student_temperature: temperature of the student softmax.
        teacher_temperature: final temperature of the teacher softmax.
        warmup_teacher_temp: initial temperature of the teacher.
        warmup_teacher_temp_epochs: epochs of the linear teacher-temperature warm-up.
        base_lambda: teacher EMA momentum at the first optimizer step.
        final_lambda: teacher EMA momentum at the end of the run (cosine schedule).
        clip_grad: per-parameter gradient norm threshold; 0 disables clipping.
        freeze_last_layer: epochs during which the student head's last layer is not updated.
        optimizer: 'sgd' (momentum 0.9 unless ``optimizer_kwargs`` says otherwise), 'adam',
            'adamW', an Optimizer class, a callable building an optimizer from parameter groups,
            or an Optimizer instance (used as is).
        learning_rate: peak learning rate (after the warm-up).
        weight_decay: weight decay.
        exclude_bias_and_norm_wd: no weight decay on biases and normalisation parameters.
        optimizer_kwargs: extra options for the optimizer.
        lr_scheduler: 'warmup_cosine', 'none' or None, an LRScheduler class or callable taking
            the optimizer (built with ``lr_scheduler_kwargs``), or a scheduler instance.
        lr_scheduler_kwargs: options for the scheduler, merged over {"warmup_epochs": 10,
            "warmup_start_lr": 1e-6, "min_lr": 0.0, "interval": "step"}; "interval" and
            "frequency" go to Lightning.
        koleo_weight: weight of the KoLeo regulariser on the student's global-view backbone
            features (:func:`nidl_dino.core.koleo.koleo_loss`; DINOv2 uses 0.1); 0 disables it. An
            addition to nidl's parameters.
        teacher_centering: ``"center"`` (DINO's EMA centring) or ``"sinkhorn_knopp"``
            (DINOv2's teacher targets, see :class:`DINOLoss`). An addition to nidl's parameters.
        sinkhorn_iterations: Sinkhorn-Knopp iterations when ``teacher_centering`` uses them.
        patch_loss_weight: weight of iBOT's masked-token loss (:class:`PatchDistillationLoss`;
            Zhou et al. ICLR 2022, DINOv2 uses 1.0); 0 disables it. The tokens are the cells of
            the backbone's last feature map (small_cnn, the ResNets; see ``patch_stage``); a
            masked token's cell is zeroed in the student's global view, the teacher sees the
            view whole; each token goes through a projection head of its own
            (``student_patch_head``, same sizes as the DINO head, untied as in DINOv2). An
            addition to nidl's parameters.
        mask_ratio: (min, max) share of a masked view's tokens that are masked, drawn
            uniformly per view (DINOv2: 0.1-0.5).
        mask_probability: probability that a global view of a sample is masked (DINOv2: 0.5).
        patch_centering: ``"global"`` (iBOT's: one centre for every token) or ``"per_token"``
            (one centre per token position, see :class:`PatchDistillationLoss`; an addition of
            this project, for registered images, where a token's position tells its anatomy).
        patch_stage: which stage's feature map gives the patch loss its tokens: 0 (the last,
            as iBOT's ViT tokens are its last block's) or k >= 1 (the k-th stage, a finer grid:
            small_cnn's stage 3 has 6^3 cells on a 48^3 view where the last has 3^3, so that
            most tokens see no border of the view). The patch head's input is that stage's
            channels; the image-level features stay the last stage's. An addition of this
            project; on the registered demo cohorts a token's position still tells its target
            (benchmarks/README.md, session 23).
        **kwargs: ``random_state`` (int or None), ``save_hparams`` (bool, default True),
            ``ignore`` (hyperparameter names not to save), ``inference_precision`` (precision of
            ``transform``, default ``"32-true"`` whatever the training precision), and any
            ``pytorch_lightning.Trainer`` option (max_epochs, max_steps, callbacks, accelerator,
            devices, precision, strategy, logger, limit_train_batches, accumulate_grad_batches,
            ...).

    Attributes:
        encoder: the teacher backbone (used at inference).
        student: student backbone.
        teacher: teacher backbone.
        student_head: student projection head (training only).
        teacher_head: teacher projection head (training only).
        loss: the :class:`DINOLoss`.
        optimizer: the optimizer used for training (its specification until ``fit`` builds it).
        lr_scheduler: the learning-rate scheduler used for training, or None.

    Example:
        >>> model = DINO(MyEncoder, encoder_kwargs={"dim": 64}, proj_input_dim=64,
        ...              num_local_crops=4, max_epochs=10)
        >>> model.fit(train_loader)          # batches [g1, g2, l1, ..., l4]
        >>> features = model.transform(volume_loader)   # (N, 64)
    """

    def __init__(
        self,
        encoder: nn.Module | type[nn.Module] | Callable[..., nn.Module],
        encoder_kwargs: dict[str, Any] | None = None,
        proj_input_dim: int = 2048,
        proj_hidden_dim: int = 2048,
        proj_bottleneck_dim: int = 256,
        proj_output_dim: int = 4096,
        proj_batch_norm: bool = True,
        proj_norm_last_layer: bool = True,
        num_local_crops: int = 8,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        base_lambda: float = 0.996,
        final_lambda: float = 1.0,
        clip_grad: float = 0.0,
        freeze_last_layer: int = 0,
        optimizer: str | type[Optimizer] | Callable[..., Optimizer] | Optimizer = "adamW",
        learning_rate: float = 3e-4,
        weight_decay: float = 5e-4,
        exclude_bias_and_norm_wd: bool = True,
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_scheduler: Any = "warmup_cosine",
        lr_scheduler_kwargs: dict[str, Any] | None = None,
        koleo_weight: float = 0.0,
        teacher_centering: str = "center",
        sinkhorn_iterations: int = 3,
        patch_loss_weight: float = 0.0,
        mask_ratio: Sequence[float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        patch_centering: str = "global",
        patch_stage: int = 0,
        **kwargs: Any,
    ):
        random_state = kwargs.pop("random_state", None)
        save_hparams = kwargs.pop("save_hparams", True)
        ignore = list(kwargs.pop("ignore", None) or [])
        super().__init__(random_state=random_state, save_hparams=save_hparams, **kwargs)
        _check_arguments(
            num_local_crops=num_local_crops,
            base_lambda=base_lambda,
            final_lambda=final_lambda,
            clip_grad=clip_grad,
            freeze_last_layer=freeze_last_layer,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )
        if save_hparams:
            # Modules, callbacks and loggers are not hyperparameters (nor serialisable as such).
            for name in ("callbacks", "logger", "plugins", "strategy"):
                if name not in ignore:
                    ignore.append(name)
            if isinstance(encoder, nn.Module):
                ignore.append("encoder")
            if isinstance(optimizer, Optimizer):
                ignore.append("optimizer")
            if not isinstance(lr_scheduler, (str, type(None))) and not inspect.isclass(
                lr_scheduler
            ):
                ignore.append("lr_scheduler")
            self.save_hyperparameters(ignore=ignore)

        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.num_local_crops = int(num_local_crops)
        self.num_large_crops = _NUM_GLOBAL_VIEWS  # DINO always uses 2 global views
        self.base_lambda = float(base_lambda)
        self.final_lambda = float(final_lambda)
        self.clip_grad = float(clip_grad or 0.0)
        self.freeze_last_layer = int(freeze_last_layer)
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.exclude_bias_and_norm_wd = bool(exclude_bias_and_norm_wd)
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self._user_lr_scheduler_kwargs = dict(lr_scheduler_kwargs or {})
        self.lr_scheduler_kwargs = {
            **_DEFAULT_LR_SCHEDULER_KWARGS,
            **self._user_lr_scheduler_kwargs,
        }
        # The specifications stay untouched so that a second fit builds fresh objects; the
        # documented ``optimizer``/``lr_scheduler`` attributes point to the built ones after fit.
        self._optimizer_spec = optimizer
        self._lr_scheduler_spec = lr_scheduler
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

        head_options = {
            "input_dim": proj_input_dim,
            "hidden_dim": proj_hidden_dim,
            "bottleneck_dim": proj_bottleneck_dim,
            "output_dim": proj_output_dim,
            "batch_norm": proj_batch_norm,
            "freeze_last_layer": freeze_last_layer,
            "norm_last_layer": proj_norm_last_layer,
        }
        with self._seeded():
            self.student = _build_encoder(encoder, self.encoder_kwargs)
            self.student_head = DINOProjectionHead(**head_options)
        encoder_dim = getattr(self.student, "output_dim", None)
        if isinstance(encoder_dim, int) and encoder_dim != proj_input_dim:
            raise ValueError(
                f"DINO: the encoder outputs {encoder_dim} features but proj_input_dim is "
                f"{proj_input_dim}: set proj_input_dim={encoder_dim}"
            )
        # The teacher starts as an exact copy of the student and is only ever moved by the EMA.
        self.teacher = copy.deepcopy(self.student)
        self.teacher_head = copy.deepcopy(self.student_head)
        for param in [*self.teacher.parameters(), *self.teacher_head.parameters()]:
            param.requires_grad_(False)

        loss_options = {
            "output_dim": proj_output_dim,
            "warmup_teacher_temp": warmup_teacher_temp,
            "teacher_temp": teacher_temperature,
            "warmup_teacher_temp_epochs": warmup_teacher_temp_epochs,
            "student_temp": student_temperature,
            "centering": teacher_centering,
            "sinkhorn_iterations": sinkhorn_iterations,
        }
        self.loss = DINOLoss(**loss_options)
        if not float(koleo_weight) >= 0.0:
            raise ValueError(f"DINO: koleo_weight must be >= 0, got {koleo_weight}")
        self.koleo_weight = float(koleo_weight)
        self.patch_loss_weight, self.mask_ratio, self.mask_probability = _check_patch_options(
            patch_loss_weight, mask_ratio, mask_probability
        )
        if patch_centering not in PATCH_CENTERINGS:
            raise ValueError(
                f"DINO: patch_centering must be one of {PATCH_CENTERINGS}, got {patch_centering!r}"
            )
        self.patch_centering = patch_centering
        if isinstance(patch_stage, bool) or not isinstance(patch_stage, int) or patch_stage < 0:
            raise ValueError(f"DINO: patch_stage must be an integer >= 0, got {patch_stage!r}")
        self.patch_stage = int(patch_stage)
        # Built only when used, so that runs without it draw the same random numbers as before.
        self.student_patch_head: DINOProjectionHead | None = None
        self.teacher_patch_head: DINOProjectionHead | None = None
        self.patch_loss: PatchDistillationLoss | None = None
        if self.patch_loss_weight > 0:
            if self.patch_stage:
                head_options["input_dim"] = _stage_channels(self.student, self.patch_stage)
            with self._seeded():
                self.student_patch_head = DINOProjectionHead(**head_options)
            self.teacher_patch_head = copy.deepcopy(self.student_patch_head)
            for param in self.teacher_patch_head.parameters():
                param.requires_grad_(False)
            self.patch_loss = PatchDistillationLoss(
                **loss_options, per_token_center=self.patch_centering == "per_token"
            )
        self._ema_step = 0  # optimizer steps already folded into the teacher (derived, see hooks)
        self._total_steps: int | None = None

    # ------------------------------------------------------------------ attributes
    @property
    def encoder(self) -> nn.Module:
        """The teacher backbone, used at inference."""
        return self.teacher

    # ------------------------------------------------------------------ forward passes
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher features (B, F) of inputs (B, C, D, H, W)."""
        return self.teacher(x)

    def parse_batch(self, batch: Any) -> tuple[list[torch.Tensor], Any]:
        """Split a batch ``[g1, g2, l1..lN]`` or ``([g1, g2, l1..lN], y)`` into (views, y).

        Raises:
            ValueError: if the batch is not in one of these formats or holds the wrong number of
                views.
        """
        expected = self.num_large_crops + self.num_local_crops
        y = None
        views = batch
        if (
            isinstance(batch, (list, tuple))
            and len(batch) == 2
            and isinstance(batch[0], (list, tuple))
        ):
            views, y = batch
        if not isinstance(views, (list, tuple)) or not all(
            isinstance(v, torch.Tensor) for v in views
        ):
            raise ValueError(
                "DINO expects batches [g1, g2, l1, ..., lN] or ([g1, g2, l1, ..., lN], y) of "
                f"tensors (B, C, D, H, W), got {_describe(batch)}: make the dataset return a "
                "list of views (nidl_dino.views.crops.MultiCropTransform)"
            )
        if len(views) != expected:
            raise ValueError(
                f"DINO expects {expected} views per batch (2 global + num_local_crops="
                f"{self.num_local_crops} local), got {len(views)}: make num_local_crops match "
                "the views' configuration"
            )
        batch_sizes = {int(v.shape[0]) for v in views}
        if len(batch_sizes) != 1:
            raise ValueError(f"DINO: all views need the same batch size, got {sorted(batch_sizes)}")
        for group in (views[: self.num_large_crops], views[self.num_large_crops :]):
            if len({tuple(v.shape) for v in group}) > 1:
                raise ValueError(
                    "DINO: views of one kind (global or local) must share a shape, got "
                    f"{[tuple(v.shape) for v in group]}"
                )
        return list(views), y

    def forward_student(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Student outputs (n_views, B, K): backbone once per resolution, head once on all."""
        return self._student_pass(views)[0]

    def _student_pass(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Student head outputs (n_views, B, K) and backbone features of the global views
        (n_global, B, F)."""
        out, global_features, _ = self._student_tokens_pass(views, None)
        return out, global_features

    def _student_tokens_pass(
        self,
        views: Sequence[torch.Tensor],
        masks: torch.Tensor | None,
        grid: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As :meth:`_student_pass`; with ``masks`` (n_global, B, L) on the token ``grid`` the
        global views are masked (:meth:`mask_views`) and their tokens' patch-head outputs
        (n_global, B, L, K) come third."""
        n_global = self.num_large_crops
        batch = views[0].shape[0]
        global_views = torch.cat(list(views[:n_global]))
        tokens_out = None
        if masks is None:
            features = [self.student(global_views)]
        else:
            global_views = self.mask_views(global_views, masks.flatten(0, 1), grid)
            pooled, tokens, _ = _pooled_and_tokens(self.student, global_views, self.patch_stage)
            features = [pooled]
            tokens_out = self.student_patch_head(tokens.flatten(0, 1))
            tokens_out = tokens_out.view(n_global, batch, tokens.shape[1], -1)
        if len(views) > n_global:
            features.append(self.student(torch.cat(list(views[n_global:]))))
        features = torch.cat(features)
        out = self.student_head(features)
        global_features = features[: n_global * batch].view(n_global, batch, -1)
        return out.view(len(views), -1, out.shape[-1]), global_features, tokens_out

    @torch.no_grad()
    def _teacher_tokens_pass(
        self, views: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Teacher outputs (2, B, K), its token outputs (2, B, L, K) and the token grid."""
        global_views = torch.cat(list(views[: self.num_large_crops]))
        pooled, tokens, grid = _pooled_and_tokens(self.teacher, global_views, self.patch_stage)
        out = self.teacher_head(pooled).view(self.num_large_crops, -1, self.teacher_head.output_dim)
        tokens_out = self.teacher_patch_head(tokens.flatten(0, 1))
        tokens_out = tokens_out.view(
            self.num_large_crops, -1, tokens.shape[1], tokens_out.shape[-1]
        )
        return out, tokens_out, grid

    def draw_masks(self, n_views: int, batch: int, n_tokens: int, device: torch.device):
        """Random token masks (n_views, B, L): each (view, sample) is masked with probability
        ``mask_probability``, then ``round(r * L)`` of its tokens (at least one), r uniform in
        ``mask_ratio``, chosen uniformly."""
        lo, hi = self.mask_ratio
        masked = torch.rand(n_views, batch, 1, device=device) < self.mask_probability
        ratio = lo + (hi - lo) * torch.rand(n_views, batch, 1, device=device)
        count = (ratio * n_tokens).round().clamp_min(1)
        # the tokens whose rank in a random permutation is below the count
        rank = torch.rand(n_views, batch, n_tokens, device=device).argsort(-1).argsort(-1)
        return (rank < count) & masked

    @staticmethod
    def mask_views(views: torch.Tensor, masks: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Zero each masked token's cell of the views (N, C, D, H, W): masks (N, L) on the token
        ``grid`` (d, h, w) of the patch stage's feature map, upsampled to the view by nearest
        neighbour."""
        cells = masks.view(masks.shape[0], 1, *grid).to(views.dtype)
        voxels = torch.nn.functional.interpolate(cells, size=views.shape[2:], mode="nearest")
        return views * (1 - voxels)

    @torch.no_grad()
    def forward_teacher(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher outputs (2, B, K) of the global views; no gradient ever flows here."""
        global_views = torch.cat(list(views[: self.num_large_crops]))
        out = self.teacher_head(self.teacher(global_views))
        return out.view(self.num_large_crops, -1, out.shape[-1])

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """One training step.

        Args:
            batch: ``[X]`` or ``([X], Y)`` where ``[X]`` holds the 2 global views first, then the
                ``num_local_crops`` local views, each (B, C, D, H, W). ``Y`` is ignored.
            batch_idx: index of the batch (ignored).
            dataloader_idx: index of the dataloader (ignored).

        Returns:
            {"loss": scalar, "z_student": (n_views, B, K), "z_teacher": (2, B, K), "y": Y}.
        """
        views, y = self.parse_batch(batch)
        batch_size = views[0].shape[0]
        patch_loss = None
        if self.patch_loss is None:
            z_student, student_features = self._student_pass(views)
            z_teacher = self.forward_teacher(views)
        else:
            z_teacher, t_tokens, grid = self._teacher_tokens_pass(views)
            masks = self.draw_masks(
                self.num_large_crops, batch_size, math.prod(grid), views[0].device
            )
            z_student, student_features, s_tokens = self._student_tokens_pass(views, masks, grid)
            patch_loss = self.patch_loss(t_tokens, s_tokens, masks, epoch=self.current_epoch)
        # Before the loss call, which moves the centre: the teacher distribution the loss sees.
        self.log_dict(
            {f"train/{k}": v for k, v in self.collapse_monitors(z_teacher).items()},
            batch_size=batch_size,
        )
        loss = self.loss(z_teacher, z_student, epoch=self.current_epoch)
        if self.koleo_weight > 0:
            koleo = torch.stack([koleo_loss(f) for f in student_features]).mean()
            self.log("train/koleo", koleo.detach(), batch_size=batch_size)
            loss = loss + self.koleo_weight * koleo
        if patch_loss is not None:
            self.log("train/patch_loss", patch_loss.detach(), batch_size=batch_size)
            loss = loss + self.patch_loss_weight * patch_loss
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            sync_dist=True,
            batch_size=batch_size,
        )
        self.log(
            "train/teacher_temp",
            self.loss.teacher_temperature(self.current_epoch),
            batch_size=batch_size,
        )
        return {"loss": loss, "z_student": z_student.detach(), "z_teacher": z_teacher, "y": y}

    @torch.no_grad()
    def collapse_monitors(self, z_teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """Entropies of the centred, sharpened teacher distribution (nats), to watch for collapse.

        DINO can collapse two ways (Caron et al. 2021, sec. 5.3): to a uniform output, where
        ``teacher_entropy`` (mean entropy of one view's distribution) rises to ln K, or to one
        dominant prototype, where ``teacher_batch_entropy`` (entropy of the batch-mean
        distribution) falls towards 0. Healthy training keeps the first well below ln K and the
        second well above it.

        Args:
            z_teacher: (n_global_views, B, K) teacher head outputs.

        Returns:
            ``{"teacher_entropy": scalar, "teacher_batch_entropy": scalar}``.
        """
        probs = self.loss.teacher_probs(z_teacher, self.current_epoch)
        per_view = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        mean_probs = probs.mean(dim=(0, 1))
        batch = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
        return {"teacher_entropy": per_view, "teacher_batch_entropy": batch}

    def validation_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any]:
        """Validation loss on a batch, leaving the centre and every training state untouched.

        Args and returns as :meth:`training_step`.
        """
        views, y = self.parse_batch(batch)
        z_student, student_features = self._student_pass(views)
        z_teacher = self.forward_teacher(views)
        loss = self.loss(z_teacher, z_student, epoch=self.current_epoch, update_center=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=views[0].shape[0])
        return {"loss": loss, "z_student": z_student, "z_teacher": z_teacher, "y": y}

    def transform_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0):
        """Encode a batch with the teacher backbone; the projection head is not applied.

        Args:
            batch: inputs (B, C, D, H, W), given as is to the encoder.
            batch_idx: index of the batch (ignored).
            dataloader_idx: index of the dataloader (ignored).

        Returns:
            The features (B, F).
        """
        return self.encoder(batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """No test step: DINO has no labels to test against."""
        return None

    # ------------------------------------------------------------------ teacher EMA
    def momentum_at(self, step: int) -> float:
        """Teacher EMA momentum applied after optimizer step ``step`` (0-based)."""
        total = self._total_steps if self._total_steps is not None else self._estimate_steps()
        return cosine_schedule(step, total, self.base_lambda, self.final_lambda)

    def _check_precision(self) -> None:
        """Refuse precisions that make the teacher or the centre half precision.

        ``16-true``/``bf16-true`` cast every parameter and buffer: the EMA step ``(1 - m) *
        (student - teacher)`` then falls below half precision's resolution at m >= 0.996 and the
        teacher stops moving. Mixed precisions keep them float32 (and the head's last layer and
        the loss run in float32, see :class:`DINOProjectionHead` and :class:`DINOLoss`).

        Raises:
            ValueError: if a teacher parameter or the centre is not float32/float64.
        """
        tensors = [
            *self.teacher.parameters(),
            *self.teacher_head.parameters(),
            self.loss.center,
        ]
        low = sorted({str(t.dtype) for t in tensors if t.dtype not in _FULL_PRECISION})
        if low:
            precision = getattr(self.trainer, "precision", "?")
            raise ValueError(
                f"DINO: precision {precision!r} makes the teacher and centre {', '.join(low)}, "
                "where the EMA update stalls: use precision '32-true', 'bf16-mixed' or '16-mixed'"
            )

    def on_train_start(self) -> None:
        self._check_precision()
        # Derived from the restored global step, so a resumed run continues the same schedule.
        self._ema_step = int(self.trainer.global_step)
        self._total_steps = self._estimate_steps()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Performs the teacher momentum update.

        Runs once per optimizer step: under gradient accumulation, batches that did not step the
        optimizer leave the teacher as it is.

        Args:
            outputs: the outputs of the training step (ignored).
            batch: the batch (ignored).
            batch_idx: index of the batch (ignored).
        """
        step = int(self.trainer.global_step)
        if step <= self._ema_step:
            return
        momentum = self.momentum_at(step - 1)
        with torch.no_grad():
            for student, teacher in self._ema_pairs():
                t_params = list(teacher.parameters())
                s_params = [p.detach() for p in student.parameters()]
                # teacher <- m * teacher + (1 - m) * student
                torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        self._average_teacher_buffers()
        self._ema_step = step
        self.log("train/momentum", momentum)
        optimizers = self.trainer.optimizers
        if optimizers:
            self.log("train/lr", optimizers[0].param_groups[0]["lr"])

    @torch.no_grad()
    def _average_teacher_buffers(self) -> None:
        """Average the teacher's float buffers (BatchNorm running statistics) over processes.

        The teacher runs in train mode, so each process moves its running statistics with its
        own batches; the EMA keeps the parameters identical but not these buffers. Averaging
        them after each optimizer step gives every rank the same teacher (and, with equal
        per-rank batches, the running mean that SyncBatchNorm would give).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        buffers = [
            b for _, module in self._ema_pairs() for b in module.buffers() if b.is_floating_point()
        ]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Classes and functions become import paths, so the checkpoint loads weights-only.
        hparams = checkpoint.get("hyper_parameters")
        if not hparams:
            return
        for key, value in list(hparams.items()):
            if inspect.isclass(value) or inspect.isfunction(value):
                path = import_path_of(value)
                if path is None:
                    del hparams[key]  # a local class/lambda: give it again when loading
                else:
                    hparams[key] = path

    def _estimate_steps(self) -> int:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError(
                "DINO needs a finite run for its momentum and LR schedules: set max_epochs or "
                "max_steps"
            )
        return int(total)

    # ------------------------------------------------------------------ optimisation
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        self.student_head.cancel_last_layer_gradients(self.current_epoch)
        if self.student_patch_head is not None:
            self.student_patch_head.cancel_last_layer_gradients(self.current_epoch)

    def _ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student module, teacher module) pairs the EMA moves."""
        pairs = [(self.student, self.teacher), (self.student_head, self.teacher_head)]
        if self.student_patch_head is not None:
            pairs.append((self.student_patch_head, self.teacher_patch_head))
        return pairs

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Per-parameter gradient clipping of the original DINO, then the Trainer's own.

        Lightning calls this hook after unscaling the gradients under mixed precision. Each
        parameter's gradient whose L2 norm exceeds ``clip_grad`` is scaled by
        ``clip_grad / (norm + 1e-6)``. Written by hand: torch's ``clip_grad_norm_`` clips the
        global norm, not each tensor.
        """
        if self.clip_grad > 0:
            grads = [
                p.grad
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
            if grads:
                norms = torch._foreach_norm(grads)
                for grad, norm in zip(grads, norms, strict=True):
                    coef = self.clip_grad / (norm + 1e-6)
                    grad.mul_(torch.clamp(coef, max=1.0))
        if gradient_clip_val:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=gradient_clip_val,
                gradient_clip_algorithm=gradient_clip_algorithm,
            )

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable student parameters, split so biases and norms get no weight decay."""
        decay, no_decay = [], []
        for module, _ in self._ema_pairs():
            for name, param in module.named_parameters():
                if not param.requires_grad:
                    continue
                if self.exclude_bias_and_norm_wd and (param.ndim <= 1 or name.endswith(".bias")):
                    no_decay.append(param)
                else:
                    decay.append(param)
        groups = [{"params": decay, "weight_decay": self.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self):
        optimizer = self._build_optimizer()
        self.optimizer = optimizer
        scheduler = self._build_scheduler(optimizer)
        self.lr_scheduler = scheduler
        if scheduler is None:
            return optimizer
        opts = {k: v for k, v in self.lr_scheduler_kwargs.items() if k in ("interval", "frequency")}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, **opts},
        }

    def _build_optimizer(self) -> Optimizer:
        spec = self._optimizer_spec
        if isinstance(spec, Optimizer):
            return spec
        groups = self.parameter_groups()
        if isinstance(spec, str) and spec.lower() not in _OPTIMIZERS:
            spec = import_object(spec)
        if isinstance(spec, str):
            cls = _OPTIMIZERS[spec.lower()]
            kwargs = {"momentum": 0.9} if cls is torch.optim.SGD else {}
            kwargs.update(self.optimizer_kwargs)
            return cls(groups, lr=self.learning_rate, weight_decay=self.weight_decay, **kwargs)
        if inspect.isclass(spec) and issubclass(spec, Optimizer):
            return spec(
                groups,
                lr=self.learning_rate,
                weight_decay=self.weight_decay,
                **self.optimizer_kwargs,
            )
        optimizer = spec(groups, **self.optimizer_kwargs)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"DINO: the optimizer callable returned {type(optimizer).__name__}, not a "
                "torch.optim.Optimizer"
            )
        return optimizer

    def _build_scheduler(self, optimizer: Optimizer):
        spec = self._lr_scheduler_spec
        if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
            return None
        kwargs = {
            k: v for k, v in self.lr_scheduler_kwargs.items() if k not in ("interval", "frequency")
        }
        if isinstance(spec, str) and spec.lower() != "warmup_cosine":
            spec = import_object(spec)
        if isinstance(spec, str):  # "warmup_cosine"
            per_step = self.lr_scheduler_kwargs.get("interval", "step") == "step"
            if per_step:
                total = self._estimate_steps()
                warmup = int(round(kwargs["warmup_epochs"] * self._steps_per_epoch()))
            else:
                total = int(self.trainer.max_epochs or 0)
                if total <= 0:
                    raise ValueError("warmup_cosine stepped per epoch needs max_epochs > 0")
                warmup = int(kwargs["warmup_epochs"])
            return WarmupCosineLR(
                optimizer,
                warmup_steps=warmup,
                total_steps=total,
                warmup_start_lr=kwargs["warmup_start_lr"],
                min_lr=kwargs["min_lr"],
            )
        if isinstance(spec, torch.optim.lr_scheduler.LRScheduler):
            return spec
        for key in ("warmup_epochs", "warmup_start_lr", "min_lr"):
            if key not in self._user_lr_scheduler_kwargs:
                kwargs.pop(key)  # defaults of warmup_cosine, not options of the user's scheduler
        return spec(optimizer, **kwargs)

    def _steps_per_epoch(self) -> float:
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            max_epochs = trainer.max_epochs or 0
            return self._estimate_steps() / max_epochs if max_epochs > 0 else 1.0
        return max(1.0, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))


def _build_encoder(encoder: Any, encoder_kwargs: dict[str, Any]) -> nn.Module:
    """DINO's ``encoder`` as a module: instances as given, classes called with
    ``encoder_kwargs``, and names (a registry name, or an import path restored from a
    checkpoint) built by the package's one factory, :func:`nidl_dino.encoders.networks.build_encoder`,
    which builds nothing but ``nn.Module`` classes from a path."""
    if isinstance(encoder, nn.Module):
        return encoder
    if isinstance(encoder, str):
        from nidl_dino.encoders.networks import build_encoder  # the registry imports MONAI: lazy

        try:
            return build_encoder({"name": encoder, "kwargs": encoder_kwargs})
        except UserError as err:
            raise TypeError(
                f"DINO: {err}; or give the encoder itself, e.g. "
                "DINO.load_from_checkpoint(path, encoder=...)"
            ) from None
    if callable(encoder):
        module = encoder(**encoder_kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"DINO: encoder built a {type(module).__name__}, not an nn.Module")
        return module
    raise TypeError(
        f"DINO: encoder must be an nn.Module class or instance, got {type(encoder).__name__}"
    )


def _pooled_and_tokens(
    encoder: nn.Module, x: torch.Tensor, stage: int = 0
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The encoder's pooled features (N, F), the mean of its last feature map (as small_cnn and
    the ResNets pool), the cells of the ``stage``-th feature map (0: the last) as tokens
    (N, L, C) and that map's grid (d, h, w)."""
    message = (
        "dino.patch_loss_weight > 0 needs an encoder whose stages are 3D feature maps "
        f"(small_cnn, resnet*), not {type(encoder).__name__}: set dino.patch_loss_weight: 0"
    )
    try:
        fmaps = stage_outputs(encoder, x)
    except UserError:
        raise UserError(message) from None
    if stage > len(fmaps):
        raise UserError(
            f"dino.patch_stage: {stage} but the encoder has {len(fmaps)} stages: set 0 (the "
            f"last) or 1-{len(fmaps)}"
        )
    last, fmap = fmaps[-1], fmaps[stage - 1]
    if last.ndim != 5 or fmap.ndim != 5:
        raise UserError(message)
    grid = tuple(int(n) for n in fmap.shape[2:])
    return last.mean(dim=(2, 3, 4)), fmap.flatten(2).transpose(1, 2), grid


@torch.no_grad()
def _stage_channels(encoder: nn.Module, stage: int) -> int:
    """Channels of the encoder's ``stage``-th feature map, from one pass of a zero volume (32^3,
    in eval mode so that no batch statistic moves; the mode is restored)."""
    was_training = encoder.training
    encoder.eval()
    try:
        x = torch.zeros(1, int(getattr(encoder, "in_channels", 1)), 32, 32, 32)
        _, tokens, _ = _pooled_and_tokens(encoder, x, stage)
    finally:
        encoder.train(was_training)
    return int(tokens.shape[-1])


def _check_patch_options(
    weight: float, ratio: Sequence[float], probability: float
) -> tuple[float, tuple[float, float], float]:
    if not float(weight) >= 0.0:
        raise ValueError(f"DINO: patch_loss_weight must be >= 0, got {weight}")
    lo, hi = (float(r) for r in ratio)
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(
            f"DINO: mask_ratio must be (min, max) with 0 < min <= max < 1, got {ratio}"
        )
    if not 0.0 < float(probability) <= 1.0:
        raise ValueError(f"DINO: mask_probability must be in (0, 1], got {probability}")
    return float(weight), (lo, hi), float(probability)


def _check_arguments(
    num_local_crops,
    base_lambda,
    final_lambda,
    clip_grad,
    freeze_last_layer,
    optimizer,
    lr_scheduler,
) -> None:
    if int(num_local_crops) < 0:
        raise ValueError(f"DINO: num_local_crops must be >= 0, got {num_local_crops}")
    for name, value in (("base_lambda", base_lambda), ("final_lambda", final_lambda)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"DINO: {name} must be in [0, 1], got {value}")
    if clip_grad is not None and float(clip_grad) < 0:
        raise ValueError(f"DINO: clip_grad must be >= 0 (0: no clipping), got {clip_grad}")
    if int(freeze_last_layer) < -1:
        raise ValueError(f"DINO: freeze_last_layer must be >= 0, got {freeze_last_layer}")
    if (
        isinstance(optimizer, str)
        and optimizer.lower() not in _OPTIMIZERS
        and not is_import_path(optimizer)
    ):
        raise ValueError(
            f"DINO: unknown optimizer '{optimizer}': use 'sgd', 'adam', 'adamW', an Optimizer "
            "class or a callable building one from parameter groups"
        )
    if not isinstance(optimizer, (str, Optimizer)) and not callable(optimizer):
        raise TypeError(f"DINO: optimizer must be a name, class or callable, got {optimizer!r}")
    if (
        isinstance(lr_scheduler, str)
        and lr_scheduler.lower() not in ("none", "warmup_cosine")
        and not is_import_path(lr_scheduler)
    ):
        raise ValueError(
            f"DINO: unknown lr_scheduler '{lr_scheduler}': use 'warmup_cosine', 'none', None, "
            "or an LRScheduler class/instance"
        )


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (list, tuple)):
        inner = ", ".join(
            f"tensor{tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
            for b in batch[:4]
        )
        return (
            f"a {type(batch).__name__} of {len(batch)} [{inner}{', ...' if len(batch) > 4 else ''}]"
        )
    return f"a {type(batch).__name__}"
