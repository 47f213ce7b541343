"""3D encoders for DINO (the one factory and its registry) and the feature readout."""
