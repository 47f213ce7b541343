"""3D encoders (backbones) for DINO, built from MONAI's networks.

Every encoder maps a batch of volumes ``(B, C, D, H, W)`` to features ``(B, D_out)`` and carries
an int attribute ``output_dim`` (``D_out``), from which the DINO head's ``proj_input_dim`` is set.

Registry (``ENCODERS``), with ``output_dim`` at default kwargs:

============  =======================================================================  ========
name          backbone                                                                 D_out
============  =======================================================================  ========
small_cnn     4 stride-2 MONAI ``ResidualUnit`` stages, global average pool (CPU/demo)  128
resnet10      ``monai.networks.nets.resnet10`` without its fc layer                    512
resnet18      ``monai.networks.nets.resnet18``                                         512
resnet34      ``monai.networks.nets.resnet34``                                         512
resnet50      ``monai.networks.nets.resnet50``                                         2048
densenet121   ``monai.networks.nets.DenseNet121`` without its output layer             1024
vit           ``monai.networks.nets.ViT`` (ViT-S/16 sized), class token or token mean   384
============  =======================================================================  ========

The ResNets default to ``conv1_t_stride=2`` (MONAI's default of 1 costs about 8x the compute at
64^3 for little gain on brain MRI). Any kwarg of the MONAI constructor can be given in
``encoder.kwargs``.

Example:
    >>> enc = build_encoder({"name": "small_cnn", "kwargs": {"channels": [8, 16, 32, 64]}})
    >>> enc(torch.zeros(2, 1, 32, 32, 32)).shape
    torch.Size([2, 64])
    >>> enc.output_dim
    64
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit
from monai.networks.nets import ViT, resnet10, resnet18, resnet34, resnet50
from monai.networks.nets.densenet import DenseNet121
from monai.utils import ensure_tuple_rep
from torch import nn

from nidl_dino.encoders.readout import stage_summary
from nidl_dino.errors import UserError

__all__ = [
    "ENCODERS",
    "IntensityBins",
    "SmallCNN",
    "ViTEncoder",
    "build_encoder",
    "encoder_output_dim",
    "parse_image_sizes",
]

Size3 = tuple[int, int, int]
ImageSizes = int | Sequence[int] | Sequence[Sequence[int]] | None


def parse_image_sizes(image_size: ImageSizes) -> list[Size3]:
    """Normalise one or several spatial sizes to a list of ``(D, H, W)`` tuples.

    Args:
        image_size: ``None``, one size (an int for a cube or ``[D, H, W]``), or several sizes
            (``[[96, 96, 96], [48, 48, 48]]`` or ``[96, 48]``, e.g. the global and local view
            sizes), in voxels. A flat list of 3 ints is one ``[D, H, W]`` size.

    Returns:
        The sizes, each a tuple of 3 ints; empty for ``None``.

    Raises:
        UserError: if a size is not an int or a sequence of 3 positive ints.
    """
    if image_size is None:
        return []
    if isinstance(image_size, int):
        return [(image_size,) * 3]
    items = list(image_size)
    if len(items) == 3 and all(isinstance(s, int) for s in items):
        items = [items]  # one [D, H, W]; any other list holds sizes (an int is a cube)
    sizes = []
    for s in items:
        size = (s,) * 3 if isinstance(s, int) else tuple(s) if isinstance(s, Sequence) else ()
        if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
            raise UserError(
                f"image size {s!r} is not an int or a list of 3 positive ints (D, H, W)"
            )
        sizes.append(size)
    return sizes


class IntensityBins(nn.Module):
    """Soft bin memberships of each voxel's intensity, as extra input channels.

    Each input channel ``x`` gives itself and ``exp(-(x - c_k)^2 / (2 s^2))`` for ``bins``
    centres ``c_k`` spread evenly over ``[low, high]`` (the preprocessed volumes' [0, 1] brain
    range), ``s`` half their spacing: a fixed (not learned) soft histogram encoding, so that a
    first convolution can respond to a tissue's intensity band (CSF, grey or white matter) and
    a spatial mean of its output can count that band's voxels, which one ReLU threshold of the
    raw intensity cannot. Written here because neither MONAI nor torch has such a layer (MONAI's
    mutual-information loss bins intensities the same way, inside the loss only).

    Args:
        bins: number of centres K (at least 2).
        low: first centre.
        high: last centre.

    Shape:
        ``(B, C, D, H, W)`` -> ``(B, C * (1 + K), D, H, W)``: per input channel, the channel
        then its K memberships.
    """

    def __init__(self, bins: int, low: float = 0.0, high: float = 1.0) -> None:
        super().__init__()
        if int(bins) < 2 or not high > low:
            raise UserError(
                f"encoder.kwargs.intensity_bins={bins} (range {low}-{high}): set 0 (off) or an "
                "integer >= 2"
            )
        self.bins = int(bins)
        self.register_buffer("centres", torch.linspace(float(low), float(high), self.bins))
        self.width = 0.5 * (float(high) - float(low)) / (self.bins - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.centres.to(x.dtype).view(1, 1, -1, *([1] * (x.ndim - 2)))
        member = torch.exp(-0.5 * ((x.unsqueeze(2) - c) / self.width) ** 2)
        return torch.cat([x.unsqueeze(2), member], dim=2).flatten(1, 2)


#: What :class:`SmallCNN` may return (its ``output`` argument).
SMALL_CNN_OUTPUTS = ("last", "stages_mean_std")


class SmallCNN(nn.Module):
    """A small 3D CNN for CPU tests and the demo.

    Each stage is a MONAI ``ResidualUnit`` (two 3^3 convolutions, norm, activation, residual) with
    stride 2, so spatial size shrinks by 2^len(channels); a global average pool gives the features.

    Args:
        in_channels: channels C of the input ``(B, C, D, H, W)``.
        channels: output channels per stage; the last one is ``output_dim``.
        norm: MONAI norm name, e.g. ``"batch"`` or ``"instance"``. Batch norm stays well defined
            when the last stage is 1 voxel wide (small local crops), instance norm does not.
        act: MONAI activation name.
        intensity_bins: 0 (off) or K >= 2: the input first goes through
            :class:`IntensityBins` (each voxel's intensity and its soft memberships of K
            intensity bands over [0, 1]).
        output: what :meth:`forward` returns, and so what DINO trains: ``"last"`` (the last
            stage's spatial mean) or ``"stages_mean_std"`` (every stage's per-channel spatial
            standard deviations, then means: the vector ``extract.pooling: stages_mean_std``
            reads out, in the same layout, so that the objective shapes the features the
            probes see; benchmarks/README.md, session 22).

    Shape:
        ``(B, C, D, H, W)`` -> ``(B, channels[-1])``, or ``(B, 2 * sum(channels))`` with
        ``output="stages_mean_std"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm: str = "batch",
        act: str = "relu",
        intensity_bins: int = 0,
        output: str = "last",
    ) -> None:
        super().__init__()
        if output not in SMALL_CNN_OUTPUTS:
            raise ValueError(f"output must be one of {SMALL_CNN_OUTPUTS}, got {output!r}")
        self.output = output
        stages = []
        self.in_channels = int(in_channels)
        c_in = in_channels
        self.stem = IntensityBins(intensity_bins) if intensity_bins else nn.Identity()
        if intensity_bins:
            c_in = in_channels * (1 + int(intensity_bins))
        for c_out in channels:
            stages.append(ResidualUnit(3, c_in, c_out, strides=2, norm=norm, act=act))
            c_in = c_out
        self.features = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1))
        self.output_dim = int(c_in) if output == "last" else 2 * sum(int(c) for c in channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "last":
            return self.pool(self.features(self.stem(x)))
        return stage_summary(self.stage_outputs(x), std=True)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after each stage, ``[(B, channels[i], D_i, H_i, W_i), ...]``."""
        x = self.stem(x)
        outputs = []
        for stage in self.features:
            x = stage(x)
            outputs.append(x)
        return outputs


class ViTEncoder(nn.Module):
    """MONAI's 3D ViT returning one vector per volume, at any input size divisible by the patch.

    MONAI's ``PatchEmbeddingBlock`` holds position embeddings for one fixed ``img_size``, while DINO
    feeds global and local crops of different sizes through the same network. As in DINO's own
    ViT, the position embeddings are interpolated (trilinear) to the input's patch grid; this is
    the only part written here, the layers are MONAI's.

    Args:
        in_channels: channels C of the input.
        img_size: size (voxels) the position embeddings are made for; other sizes are interpolated.
        patch_size: patch size in voxels; every input size must be divisible by it.
        hidden_size: token dimension, the ``output_dim``.
        mlp_dim: hidden size of the transformer MLPs.
        num_layers: transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        pool: ``"cls"`` (class token, as in DINO) or ``"mean"`` (mean of the patch tokens).
        **vit_kwargs: other ``monai.networks.nets.ViT`` arguments (``pos_embed_type``,
            ``dropout_rate``, ``qkv_bias``, ...). ``proj_type`` must stay ``"conv"``.

    Shape:
        ``(B, C, D, H, W)`` -> ``(B, hidden_size)``.

    Raises:
        UserError: if ``img_size`` or an input size is not divisible by ``patch_size``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        img_size: int | Sequence[int] = 96,
        patch_size: int | Sequence[int] = 16,
        hidden_size: int = 384,
        mlp_dim: int = 1536,
        num_layers: int = 12,
        num_heads: int = 6,
        pool: str = "cls",
        **vit_kwargs: Any,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise UserError(f"encoder 'vit': pool={pool!r}; choose 'cls' or 'mean'")
        if vit_kwargs.get("proj_type", "conv") != "conv":
            raise UserError("encoder 'vit': only proj_type='conv' takes several input sizes")
        self.patch_size: Size3 = tuple(int(p) for p in ensure_tuple_rep(patch_size, 3))
        self.img_size: Size3 = tuple(int(s) for s in ensure_tuple_rep(img_size, 3))
        self.check_input_size(self.img_size)
        self.pool = pool
        self.vit = ViT(
            in_channels=in_channels,
            img_size=self.img_size,
            patch_size=self.patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            classification=pool == "cls",
            spatial_dims=3,
            **vit_kwargs,
        )
        if pool == "cls":
            self.vit.classification_head = nn.Identity()
        self.output_dim = int(hidden_size)

    def check_input_size(self, size: Sequence[int]) -> None:
        """Raise a one-line ``UserError`` unless ``size`` (D, H, W voxels) fits the patch size."""
        size = tuple(int(s) for s in size)
        if any(s % p or s < p for s, p in zip(size, self.patch_size, strict=True)):
            raise UserError(
                f"encoder 'vit': image size {size} is not a multiple of patch_size "
                f"{self.patch_size}; set views.global_size/local_size to multiples of the patch "
                "size or change encoder.kwargs.patch_size"
            )

    def _position_embeddings(self, grid: Sequence[int]) -> torch.Tensor:
        pos = self.vit.patch_embedding.position_embeddings  # (1, N, hidden)
        base = [s // p for s, p in zip(self.img_size, self.patch_size, strict=True)]
        if list(grid) == base:
            return pos
        pos = pos.reshape(1, *base, -1).permute(0, 4, 1, 2, 3)
        pos = F.interpolate(pos, size=tuple(grid), mode="trilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_outputs(x, last=1)[0]

    def stage_outputs(self, x: torch.Tensor, last: int = 4) -> list[torch.Tensor]:
        """The pooled token (class token or token mean) after each of the ``last`` blocks.

        Each block's tokens go through the final norm first, as DINO's linear evaluation of ViT-S
        does when it concatenates the class tokens of the last 4 blocks (Caron et al. 2021, sec.
        4 / appendix); the last one is :meth:`forward`'s output. Shapes ``[(B, hidden_size)]``.
        """
        self.check_input_size(x.shape[2:])
        embed = self.vit.patch_embedding
        tokens = embed.patch_embeddings(x)  # (B, hidden, d, h, w)
        grid = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = embed.dropout(tokens + self._position_embeddings(grid))
        if self.pool == "cls":
            tokens = torch.cat([self.vit.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        outputs = []
        first_kept = len(self.vit.blocks) - max(1, int(last))
        for i, block in enumerate(self.vit.blocks):
            tokens = block(tokens)
            if i >= first_kept:
                normed = self.vit.norm(tokens)
                outputs.append(normed[:, 0] if self.pool == "cls" else normed.mean(dim=1))
        return outputs


def _small_cnn(in_channels: int, image_sizes: list[Size3], **kwargs: Any) -> nn.Module:
    return SmallCNN(in_channels=in_channels, **kwargs)


def _monai_resnet(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(in_channels: int, image_sizes: list[Size3], **kwargs: Any) -> nn.Module:
        kwargs = {"conv1_t_stride": 2, **kwargs}
        model = factory(spatial_dims=3, n_input_channels=in_channels, feed_forward=False, **kwargs)
        model.output_dim = int(model.in_planes)  # channels after layer4, i.e. the pooled size
        return model

    build.__doc__ = f"MONAI ``{factory.__name__}`` (3D, no fc layer, conv1 stride 2 by default)."
    return build


def _densenet121(in_channels: int, image_sizes: list[Size3], **kwargs: Any) -> nn.Module:
    # conv0 and the max pool halve (rounding up), then 3 transitions halve with a 2^3 average
    # pool that needs 2 voxels: sides under 29 voxels fail deep inside the network.
    for size in image_sizes:
        if min(size) < 29:
            raise UserError(
                f"encoder 'densenet121': image size {size} is too small (at least 29 voxels "
                "per side); raise views.local_size/global_size or choose another encoder"
            )
    model = DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=1, **kwargs)
    out_dim = model.class_layers.out.in_features
    model.class_layers.out = nn.Identity()
    model.output_dim = int(out_dim)
    return model


def _vit(in_channels: int, image_sizes: list[Size3], **kwargs: Any) -> nn.Module:
    if importlib.util.find_spec("einops") is None:  # MONAI's attention blocks import it lazily
        raise UserError("encoder 'vit' needs the einops package: pip install einops")
    if "img_size" not in kwargs and image_sizes:
        kwargs["img_size"] = image_sizes[0]
    model = ViTEncoder(in_channels=in_channels, **kwargs)
    for size in image_sizes:
        model.check_input_size(size)
    return model


#: Encoder registry: name -> factory ``(in_channels, image_sizes, **kwargs) -> nn.Module``.
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": _small_cnn,
    "resnet10": _monai_resnet(resnet10),
    "resnet18": _monai_resnet(resnet18),
    "resnet34": _monai_resnet(resnet34),
    "resnet50": _monai_resnet(resnet50),
    "densenet121": _densenet121,
    "vit": _vit,
}


def _import_class(path: str) -> Callable[..., nn.Module]:
    """The nn.Module class an import path names; anything else is refused before any call."""
    from nidl_dino.importing import import_object

    obj = import_object(path)
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise UserError(
            f"encoder import path {path!r} names a {type(obj).__name__}, not an nn.Module "
            "class: give 'package.module:Class' of a torch.nn.Module subclass"
        )
    return obj


def _split_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, Mapping):
        raise UserError(f"encoder {spec!r} is neither a name nor a {{name, kwargs}} mapping")
    unknown = set(spec) - {"name", "kwargs"}
    if unknown:
        raise UserError(f"encoder: unknown key(s) {sorted(unknown)}; only 'name' and 'kwargs'")
    if "name" not in spec:
        raise UserError("encoder: missing 'name'; e.g. encoder: {name: small_cnn, kwargs: {}}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise UserError(f"encoder.kwargs must be a mapping, got {kwargs!r}")
    return str(spec["name"]), dict(kwargs)


def _infer_output_dim(model: nn.Module, in_channels: int, sizes: list[Size3]) -> int:
    size = sizes[0] if sizes else (32, 32, 32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, *size))
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"encoder {type(model).__name__} returns {shape}, not (B, D) features")
    return int(out.shape[1])


def build_encoder(
    spec: str | Mapping[str, Any] | nn.Module,
    in_channels: int = 1,
    image_size: ImageSizes = None,
) -> nn.Module:
    """Build a 3D encoder from a registry name, a ``{name, kwargs}`` mapping or an import path.

    Args:
        spec: a name of ``ENCODERS``; a mapping ``{"name": ..., "kwargs": {...}}`` (the
            ``encoder:`` section of config.yaml); an import path ``"package.module:Class"`` or
            ``"package.module.Class"`` (also as ``name`` of the mapping, then called with
            ``kwargs`` only); or an ``nn.Module`` (returned as is, with ``output_dim`` set).
        in_channels: channels C of the input volumes (registry encoders only).
        image_size: the input size(s) in voxels the encoder will see, e.g. the global and local
            view sizes ``[[96, 96, 96], [48, 48, 48]]``. Checked now (ViT patch divisibility) and
            used as the ViT's ``img_size``; ``None`` skips the checks.

    Returns:
        A module mapping ``(B, C, D, H, W)`` to ``(B, output_dim)``, with int ``output_dim``.

    Raises:
        UserError: unknown name, unimportable path, bad kwargs, or a size the encoder cannot take.
    """
    sizes = parse_image_sizes(image_size)
    if isinstance(spec, nn.Module):
        model = spec
    else:
        name, kwargs = _split_spec(spec)
        if name in ENCODERS:
            factory, args = ENCODERS[name], (in_channels, sizes)
        elif "." in name or ":" in name:
            factory, args = _import_class(name), ()
        else:
            raise UserError(
                f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)} "
                "or give an import path 'package.module:Class'"
            )
        try:
            inspect.signature(factory).bind(*args, **kwargs)
        except TypeError as err:
            raise UserError(f"encoder {name!r}: bad encoder.kwargs {kwargs} ({err})") from None
        except ValueError:  # builtins/C extensions without a signature: let the call decide
            pass
        try:
            model = factory(*args, **kwargs)
        except (TypeError, ValueError, AssertionError) as err:
            reason = " ".join(str(err).split())  # MONAI's messages span lines; ours are one line
            raise UserError(f"encoder {name!r}: bad encoder.kwargs {kwargs} ({reason})") from None
    if not isinstance(getattr(model, "output_dim", None), int):
        model.output_dim = _infer_output_dim(model, in_channels, sizes)
    return model


def encoder_output_dim(
    spec: str | Mapping[str, Any] | nn.Module, in_channels: int = 1, image_size: ImageSizes = None
) -> int:
    """Feature size ``D_out`` of an encoder spec, e.g. to set the head's ``proj_input_dim``.

    The encoder is built on PyTorch's ``meta`` device (no memory, no compute) when possible.

    Args:
        spec: as for :func:`build_encoder`.
        in_channels: channels C of the input volumes.
        image_size: as for :func:`build_encoder`.

    Returns:
        ``output_dim`` of the built encoder.

    Raises:
        UserError: as :func:`build_encoder`.
    """
    if isinstance(spec, nn.Module):
        return build_encoder(spec, in_channels, image_size).output_dim
    try:
        with torch.device("meta"):
            return build_encoder(spec, in_channels, image_size).output_dim
    except UserError:
        raise
    except Exception:  # an import-path class that cannot live on the meta device
        return build_encoder(spec, in_channels, image_size).output_dim
