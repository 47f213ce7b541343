"""The DINO projection head: MLP, L2-normalised bottleneck, weight-normalised prototype layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOProjectionHead(nn.Module):
    """Projection head used in DINO (Caron et al., ICCV 2021), with nidl's interface.

    A 3-layer MLP (``input_dim -> hidden_dim -> hidden_dim -> bottleneck_dim``, GELU and optional
    BatchNorm between layers, a linear bottleneck), an L2 normalisation, then a weight-normalised
    linear layer without bias to ``output_dim`` prototypes (as in SwAV). The MLP weights are drawn
    from a truncated normal of std 0.02, biases are zero; the last layer's norm ``g`` is fixed to 1
    and not trained when ``norm_last_layer``.

    Precision: the L2 normalisation and the prototype layer run in float32 with autocast
    disabled (the output is float32 under any autocast): the prototype logits are divided by
    temperatures of 0.01-0.1 in the loss, which bf16's 8-bit mantissa does not survive. The MLP
    follows the caller's autocast.

    Args:
        input_dim: input dimension (the encoder's output dimension).
        hidden_dim: hidden dimension of the MLP.
        bottleneck_dim: dimension of the bottleneck before the last layer.
        output_dim: number of prototypes K.
        batch_norm: BatchNorm after the two hidden linear layers (False for ViT backbones).
        freeze_last_layer: number of epochs during which the last layer's gradients are cancelled
            by :meth:`cancel_last_layer_gradients` (-1 or 0: never).
        norm_last_layer: fix the weight norm of the last layer to 1 (more stable training).

    Example:
        >>> head = DINOProjectionHead(input_dim=32, hidden_dim=64, bottleneck_dim=16, output_dim=100)
        >>> head(torch.randn(4, 32)).shape
        torch.Size([4, 100])
    """

    def __init__(
        self,
        input_dim: int = 2048,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        output_dim: int = 4096,
        batch_norm: bool = True,
        freeze_last_layer: int = -1,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("input_dim", input_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("output_dim", output_dim),
        ):
            if int(value) < 1:
                raise ValueError(f"DINOProjectionHead: {name} must be >= 1, got {value}")
        self.input_dim = int(input_dim)
        self.hidden_dim = int(hidden_dim)
        self.bottleneck_dim = int(bottleneck_dim)
        self.output_dim = int(output_dim)
        self.batch_norm = bool(batch_norm)
        self.freeze_last_layer = int(freeze_last_layer)
        self.norm_last_layer = bool(norm_last_layer)

        def block(d_in: int, d_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
            if self.batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.GELU())
            return layers

        self.mlp = nn.Sequential(
            *block(self.input_dim, self.hidden_dim),
            *block(self.hidden_dim, self.hidden_dim),
            nn.Linear(self.hidden_dim, self.bottleneck_dim),
        )
        self.mlp.apply(self._init_weights)
        # The prototype layer keeps PyTorch's default init for its direction v (as the original
        # DINO does: its init pass runs before this layer exists); only its norm g is set to 1.
        self.last_layer = weight_norm(nn.Linear(self.bottleneck_dim, self.output_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        if self.norm_last_layer:
            magnitude.requires_grad_(False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project features (B, input_dim) to prototype scores (B, output_dim).

        Raises:
            ValueError: if the last dimension of ``x`` is not ``input_dim``.
        """
        if x.ndim != 2 or x.shape[-1] != self.input_dim:
            raise ValueError(
                f"DINOProjectionHead expects features of shape (B, {self.input_dim}), got "
                f"{tuple(x.shape)}: set proj_input_dim to the encoder's output dimension"
            )
        x = self.mlp(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, p=2)
            return self.last_layer(x)

    def cancel_last_layer_gradients(self, current_epoch: int) -> None:
        """Drop the last layer's gradients while ``current_epoch < freeze_last_layer``.

        Called after the backward pass and before the optimizer step: parameters whose ``grad`` is
        None are skipped by the optimizers (no update, no weight decay).
        """
        if current_epoch >= self.freeze_last_layer:
            return
        for param in self.last_layer.parameters():
            param.grad = None
