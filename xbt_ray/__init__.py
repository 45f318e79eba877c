"""xbt-ray: cross-modal backward-compatible CLIP upgrades (XBT) as distributed training on Ray."""
__version__ = "0.1.0"
