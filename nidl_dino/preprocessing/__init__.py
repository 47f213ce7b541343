"""Preprocessing of brain MRI volumes for DINO: one scan in, a volume on a fixed MNI grid out.

``preprocess_scan`` is the entry point the workflow calls; ``DEFAULT_CONFIG`` holds every knob
(the ``preprocessing:`` section of config.yaml). One module per step: ``io`` and ``validate``
(reading, rejecting), ``orientation``, ``bias`` (N4), ``registration`` (ANTs affine to
MNI152), ``mask``, ``resample``, ``normalize``, ``qc``; ``pipeline`` composes them.
"""

from nidl_dino.preprocessing.config import DEFAULT_CONFIG, merge_config
from nidl_dino.preprocessing.pipeline import output_paths, preprocess_scan

__all__ = ["DEFAULT_CONFIG", "merge_config", "output_paths", "preprocess_scan"]
