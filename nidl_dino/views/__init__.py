"""Multi-crop views of a volume: on the CPU (MONAI transforms) and on the device."""
