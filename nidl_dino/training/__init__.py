"""Training from the config: data, volume cache, devices and ranks, progress, curves."""
