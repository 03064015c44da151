"""Pixel decoders (paper Table 4e).  Importing this package registers every kind."""
from importlib import import_module

KINDS = ("msdeform", "fpn", "semantic_fpn", "bifpn", "fapn", "transformer_encoder")

for _kind in KINDS:
    try:
        import_module(f"m2f.models.pixel_decoders.{_kind}")
    except ModuleNotFoundError as e:  # pragma: no cover - only while a module is being written
        if e.name != f"m2f.models.pixel_decoders.{_kind}":
            raise
