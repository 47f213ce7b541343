"""The KoLeo regulariser: spread a batch's features by pushing each away from its nearest neighbour.

Kozachenko-Leonenko differential-entropy estimator as a loss (Sablayrolles et al., "Spreading
vectors for similarity search", ICLR 2019), used by DINOv2 on the student's global-view features
(Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024, sec. 4):

    L = -1/n sum_i log(d_{n,i}),   d_{n,i} = min_{j != i} || x_i - x_j ||,

with every ``x_i`` L2-normalised first. It is small when the features are spread uniformly over
the sphere and large when two samples nearly coincide, which counters a partial collapse of the
features (registered brains all look alike).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The KoLeo loss of a batch of features, in float32 under any autocast.

    Args:
        features: (B, F) features, B >= 2.
        eps: added to the distances before the log (and used by the normalisation).

    Returns:
        The scalar loss; its gradient flows into ``features``.

    Raises:
        ValueError: fewer than 2 samples (no neighbour).
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (B >= 2, F) features, got {tuple(features.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.float(), dim=-1, eps=eps)
        with torch.no_grad():  # the neighbour is chosen without gradient, as in DINOv2
            similarity = x @ x.T
            similarity.diagonal().fill_(-2.0)  # never its own neighbour (cosines are >= -1)
            neighbour = similarity.argmax(dim=1)
        distance = (x - x[neighbour]).norm(dim=-1)
        return -torch.log(distance + eps).mean()
