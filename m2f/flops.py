"""FLOPs with fvcore, as the paper counts them (one multiply-add = one flop; fvcore's convention).

fvcore traces the model with torch.jit; ops it has no handle for (e.g. grid_sample inside the
deformable attention, as with the official CUDA op) are not counted and are listed in ``skipped``.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict

import torch

from m2f.config import Config


def count_flops(cfg: Config, height: int, width: int, model=None) -> Dict[str, Any]:
    """fvcore FLOPs of one ``height`` x ``width`` image (``model``: a built model of ``cfg``; default:
    built here).  Under ``torch.jit.trace`` every fast path runs its reference ops (explicit attention
    softmax, ``F.linear`` for the oneDNN GEMMs, einsum for the mask head), which fvcore counts."""
    from fvcore.nn import FlopCountAnalysis

    from m2f.models.build import build_model

    if model is None:
        model = build_model(cfg)
    model.eval()
    x = torch.randn(1, 3, height, width)

    class _Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, images):
            out = self.m(images)
            return out.class_logits, out.mask_logits

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(_Wrap(model), (x,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = fca.total()
        by_module = {k: v for k, v in fca.by_module().items() if k.count(".") == 1}
        skipped = dict(fca.unsupported_ops())
    return {
        "gflops": total / 1e9,
        "size": [height, width],
        "params": sum(p.numel() for p in model.parameters()),
        "gflops_by_part": {k.split(".", 1)[1]: v / 1e9 for k, v in by_module.items()},
        "skipped_ops": skipped,
    }
