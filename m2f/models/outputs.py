"""Typed model outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch import Tensor


@dataclass
class MaskPrediction:
    """One set prediction.

    class_logits: [B, Q, K + 1]  (last index = "no object")
    mask_logits:  [B, Q, H/4, W/4]  (H, W = padded input size)
    """

    class_logits: Tensor
    mask_logits: Tensor


@dataclass
class Mask2FormerOutput:
    """All predictions of one forward pass.

    ``class_logits`` / ``mask_logits`` are the final (last decoder layer) prediction;
    ``aux`` holds the earlier ones in order: with the default config the first is made from the
    learnable query features alone (before decoder layer 1), then one per decoder layer but the
    last: 1 + 9 = 10 predictions in all (see :meth:`predictions`).
    ``layer_outputs`` [optional] query embeddings after each layer, for analysis.
    """

    class_logits: Tensor
    mask_logits: Tensor
    aux: List[MaskPrediction] = field(default_factory=list)
    attention_maps: Optional[List[Tensor]] = None

    @property
    def final(self) -> MaskPrediction:
        return MaskPrediction(self.class_logits, self.mask_logits)

    def predictions(self) -> List[MaskPrediction]:
        """Every prediction, first to last (aux..., final)."""
        return [*self.aux, self.final]
