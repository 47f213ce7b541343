"""The feature readout: what vector a trained backbone gives for a volume (``extract.pooling``).

``last`` is the encoder's own output, what DINO trains; ``stages`` and ``stages_mean_std`` join
spatial summaries of every stage of the backbone (:class:`StagePooling`), found by
:func:`stage_outputs` for the registry's encoders (:mod:`nidl_dino.encoders.networks`) or by a
``stage_outputs(x)`` method of any other module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.densenet import DenseNet
from monai.networks.nets.resnet import ResNet
from torch import nn

from nidl_dino.errors import UserError
from nidl_dino.settings import defaults

__all__ = [
    "DEFAULT_POOLING",
    "POOLINGS",
    "StagePooling",
    "feature_encoder",
    "stage_outputs",
    "stage_summary",
]


def _resnet_stages(model: ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    # The stem and layer1-4 exactly as MONAI's ResNet.forward runs them, keeping each layer's map.
    x = model.act(model.bn1(model.conv1(x)))
    if not model.no_max_pool:
        x = model.maxpool(x)
    outputs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outputs.append(x)
    return outputs


def _densenet_stages(model: DenseNet, x: torch.Tensor) -> list[torch.Tensor]:
    # After each transition (the dense blocks' outputs, halved), then the last block with the
    # norm and activation that MONAI's class_layers apply before pooling.
    outputs = []
    for name, module in model.features.named_children():
        x = module(x)
        if name.startswith("transition"):
            outputs.append(x)
    outputs.append(model.class_layers.relu(x))
    return outputs


def stage_outputs(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of an encoder's stages, coarsest last, for multi-stage features.

    Registry encoders: small_cnn (every stage), the MONAI ResNets (layer1-4), DenseNet121 (after
    each transition and the last block), the ViT (pooled tokens of the last 4 blocks). Any other
    module may define ``stage_outputs(x) -> list[Tensor]`` itself.

    Args:
        encoder: the backbone.
        x: input batch ``(B, C, D, H, W)``.

    Returns:
        Tensors ``(B, C_i, ...)``: feature maps ``(B, C_i, D_i, H_i, W_i)`` or vectors ``(B, C_i)``.

    Raises:
        UserError: the encoder has no known stages.
    """
    if callable(getattr(encoder, "stage_outputs", None)):
        return list(encoder.stage_outputs(x))
    if isinstance(encoder, ResNet):
        return _resnet_stages(encoder, x)
    if isinstance(encoder, DenseNet):
        return _densenet_stages(encoder, x)
    raise UserError(
        f"encoder {type(encoder).__name__} has no stages to pool: set extract.pooling: last, "
        "or give the class a stage_outputs(x) method returning its stages' feature maps"
    )


def stage_summary(outputs: Sequence[torch.Tensor], std: bool = True) -> torch.Tensor:
    """Per channel of every stage output, the spatial standard deviations (maps only, with
    ``std``), then the spatial means (vectors as they are): the ``stages`` and
    ``stages_mean_std`` layout, whose last features are the last stage's mean.

    Shape: ``[(B, C_i, ...)]`` -> ``(B, sum C_i [+ sum over maps of C_i])``.
    """
    means = [t.flatten(2).mean(dim=2) if t.ndim > 2 else t for t in outputs]
    stds = [t.flatten(2).std(dim=2, correction=0) for t in outputs if std and t.ndim > 2]
    return torch.cat(stds + means, dim=1)


class StagePooling(nn.Module):
    """Features from every stage of an encoder: each stage's map summarised over space, joined.

    DINO trains the last stage's pooled output, but on registered brains the earlier, finer stages
    hold much of the age signal that a global average of the last stage loses (README, Feature
    quality). Joining per-stage summaries is the multi-layer readout of linear evaluation (DINO
    joins the class tokens of a ViT's last 4 blocks). Written here because MONAI's networks return
    only their last stage.

    With ``std=True`` each feature map also gives its spatial standard deviation per channel (how
    much a channel's response varies across the brain, a texture/contrast summary the mean loses);
    vectors (ViT tokens) have no spatial extent and give their values only. With ``quantiles``
    each map also gives, per channel, those quantiles of its values over the brain (the voxels
    where the input is non-zero: preprocessed volumes are zero outside the dilated brain mask),
    a histogram-like summary of the channel, as the brain-intensity histogram is of the
    intensities. Layout: the quantiles of every map (channel-major), then the standard
    deviations, then the means; so the last ``encoder.output_dim`` features are always the
    encoder's own output.

    Args:
        encoder: a backbone that :func:`stage_outputs` knows.
        std: add the per-channel spatial standard deviation of each feature map.
        probe_size: input size (voxels) of the one forward pass that finds ``output_dim``;
            ``None``: the ViT's ``img_size``, else 32^3.
        quantiles: spatial quantiles in [0, 1] per channel of each feature map (none: off).

    Shape:
        ``(B, C, D, H, W)`` -> ``(B, sum of the stages' channels [x 2 with std for maps])``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        std: bool = False,
        probe_size: Sequence[int] | None = None,
        quantiles: Sequence[float] = (),
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.std = bool(std)
        self.quantiles = tuple(float(q) for q in quantiles)
        if any(not 0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"StagePooling: quantiles must lie in [0, 1], got {self.quantiles}")
        if probe_size is None:
            probe_size = getattr(encoder, "img_size", (32, 32, 32))
        param = next(encoder.parameters(), None)
        kwargs = {"device": param.device, "dtype": param.dtype} if param is not None else {}
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                out = self(torch.zeros(1, _in_channels(encoder), *probe_size, **kwargs))
        finally:
            encoder.train(was_training)
        self.output_dim = int(out.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = stage_outputs(self.encoder, x)
        summary = stage_summary(outputs, std=self.std)
        if not self.quantiles:
            return summary
        inside = (x != 0).any(dim=1, keepdim=True).float()
        spreads = [self._quantiles(t, inside) for t in outputs if t.ndim > 2]
        return torch.cat([*spreads, summary], dim=1)

    def _quantiles(self, t: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        # Order statistics of each channel over the voxels inside the input's non-zero region
        # (area-resampled to the map's grid), (B, C * len(quantiles)), channel-major; a sample
        # with no such voxel uses the whole map. The nearest rank at or below q (n - 1), by a
        # sort (torch.quantile refuses more than 2^24 elements: a batch of 64^3 maps). A map of
        # more than QUANTILE_VOXELS voxels is ranked on a regular grid of every s-th voxel
        # along each axis (a 64^3 stage: every 2nd, 8x cheaper; a quantile's rank moves by
        # well under 1 % of the brain).
        b, c = t.shape[:2]
        keep = F.interpolate(inside, size=t.shape[2:], mode="area") > 0.5
        step = math.ceil((math.prod(t.shape[2:]) / QUANTILE_VOXELS) ** (1 / 3) - 1e-9)
        if step > 1:
            t = t[:, :, ::step, ::step, ::step]
            keep = keep[:, :, ::step, ::step, ::step]
        keep = keep.flatten(1)
        keep |= ~keep.any(dim=1, keepdim=True)
        flat = t.float().flatten(2).masked_fill(~keep[:, None, :], float("inf"))
        flat = flat.sort(dim=2).values
        counts = keep.sum(dim=1, keepdim=True).float()  # (B, 1)
        q = torch.tensor(self.quantiles, device=t.device, dtype=torch.float32)[None, :]
        index = torch.floor(q * (counts - 1)).long()  # (B, Q)
        picked = flat.gather(2, index[:, None, :].expand(b, c, -1))
        return picked.flatten(1).to(t.dtype)


def _in_channels(encoder: nn.Module) -> int:
    """Input channels: the encoder's ``in_channels`` attribute, else those of its first
    convolution (1 when there is none)."""
    declared = getattr(encoder, "in_channels", None)
    if isinstance(declared, int):
        return declared
    for module in encoder.modules():
        if isinstance(module, nn.Conv3d):
            return int(module.in_channels)
    return 1


#: Feature readouts of ``extract.pooling``: ``last`` (the encoder's output, what DINO trains),
#: ``stages`` (spatial mean of every stage, :class:`StagePooling`) or ``stages_mean_std`` (and
#: each stage's spatial standard deviation).
POOLINGS = ("last", "stages", "stages_mean_std", "stages_quantiles")
#: The spatial quantiles of ``stages_quantiles``: a 5-point summary of each channel's
#: distribution over the volume (in the spirit of the brain-intensity histogram baseline,
#: for learned channels).
STAGE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
#: Maps with more voxels than this are ranked on a regular subgrid (:class:`StagePooling`).
QUANTILE_VOXELS = 32**3
#: The readout when config.yaml's ``extract.pooling`` is absent (its shipped value).
DEFAULT_POOLING: str = defaults("extract", "pooling")


def feature_encoder(encoder: nn.Module, pooling: str = DEFAULT_POOLING) -> nn.Module:
    """The module that turns a volume into its feature vector, for a pooling of ``POOLINGS``.

    Raises:
        UserError: an unknown pooling, or ``stages`` for an encoder without known stages.
    """
    if pooling == "last":
        return encoder
    if pooling in ("stages", "stages_mean_std"):
        return StagePooling(encoder, std=pooling == "stages_mean_std")
    if pooling == "stages_quantiles":
        return StagePooling(encoder, std=True, quantiles=STAGE_QUANTILES)
    raise UserError(f"extract.pooling={pooling!r}; choose one of {', '.join(POOLINGS)}")
