"""m2f: a reproducible benchmark and ablation suite for Mask2Former."""
__version__ = "0.1.0"
