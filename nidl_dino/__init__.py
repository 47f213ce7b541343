"""nidl-dino: DINO self-supervised features for 3D brain MRI."""

from nidl_dino.estimator import DINO
from nidl_dino.head import DINOProjectionHead
from nidl_dino.loss import DINOLoss

__all__ = ["DINO", "DINOLoss", "DINOProjectionHead"]
__version__ = "0.1.0"
