"""Inference post-processing: turn one prediction (``class_logits [Q, K+1]``, ``mask_logits [Q, H, W]``)
into semantic, panoptic and instance results, following the official Mask2Former definitions
(shared/PAPER.md, "Inference"):

- semantic: ``sum_q softmax(class)[q, :K] * sigmoid(mask)[q]`` -> ``[K, H, W]``;
- panoptic: keep queries whose label is not "no object" and whose score > ``object_mask_threshold``;
  every pixel goes to ``argmax_q score_q * sigmoid(mask_q)``; a query keeps its segment only if
  its visible area / area(sigmoid >= 0.5) >= ``overlap_threshold``; a pixel is painted only where the
  winning query's own mask is >= 0.5; stuff segments of one class are merged;
- instance: top-k over the ``Q x K`` (query, class) scores (no "no object"), thing classes only for a
  panoptic model, mask = logit > 0, score = class prob x mean sigmoid inside the mask.

:func:`postprocess` runs them on a batch of model outputs (resizing as the official code does).
These run after the model, on its outputs; they may synchronise with the host.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["semantic_inference", "panoptic_inference", "instance_inference", "resize_mask_logits", "postprocess"]


def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-class semantic scores.

    class_logits: [Q, K+1]; mask_logits: [Q, H, W]  ->  [K, H, W] (float, not normalised over K).
    """
    cls = class_logits.float().softmax(-1)[:, :-1]  # [Q, K] without "no object"
    masks = mask_logits.float().sigmoid()  # [Q, H, W]
    return torch.einsum("qk,qhw->khw", cls, masks)


def panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    is_thing: Optional[Tensor] = None,
) -> Tuple[Tensor, List[Dict[str, Any]]]:
    """Panoptic segmentation of one image.

    class_logits: [Q, K+1]; mask_logits: [Q, H, W]; is_thing: bool [K] (None: every class is a thing,
    so nothing is merged).
    Returns ``(panoptic_seg int32 [H, W], segments_info)``: ``panoptic_seg`` holds segment ids 1..N
    (0 = void); ``segments_info`` one dict per segment ``{"id", "category_id" (contiguous),
    "isthing", "score" (class prob of the first query of the segment), "area" (pixels)}``.
    """
    Q, K1 = class_logits.shape
    K = K1 - 1
    H, W = mask_logits.shape[-2:]
    device = mask_logits.device
    scores, labels = class_logits.float().softmax(-1).max(-1)  # [Q], [Q]
    keep = labels.ne(K) & (scores > object_mask_threshold)  # [Q]
    panoptic_seg = torch.zeros((H, W), dtype=torch.int32, device=device)
    if not bool(keep.any()):
        return panoptic_seg, []
    cur_scores, cur_labels = scores[keep], labels[keep]  # [N], [N]
    cur_masks = mask_logits[keep].float().sigmoid()  # [N, H, W]
    N = cur_masks.shape[0]

    winner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)  # [H, W] index into the N kept queries
    winner_fg = cur_masks.gather(0, winner[None])[0] >= 0.5  # [H, W] winner's own mask covers the pixel
    mask_area = torch.bincount(winner.flatten(), minlength=N)  # [N] pixels won
    original_area = (cur_masks >= 0.5).flatten(1).sum(1)  # [N] pixels of the binary mask
    painted_area = torch.bincount(winner[winner_fg], minlength=N)  # [N] pixels won and inside own mask
    valid = (mask_area > 0) & (original_area > 0) & (painted_area > 0)
    valid &= mask_area.double() / original_area.clamp(min=1).double() >= overlap_threshold  # [N]

    # Assign segment ids in query order; stuff queries of one class share the first one's id.
    thing_of = is_thing.to(device)[cur_labels] if is_thing is not None else torch.ones_like(valid)
    seg_of_query = [0] * N
    segments: List[Dict[str, Any]] = []
    stuff_seg: Dict[int, int] = {}
    for k, (v, lab, th, sc) in enumerate(zip(valid.tolist(), cur_labels.tolist(), thing_of.tolist(), cur_scores.tolist())):
        if not v:
            continue
        if not th and lab in stuff_seg:
            seg_of_query[k] = stuff_seg[lab]
            continue
        sid = len(segments) + 1
        seg_of_query[k] = sid
        if not th:
            stuff_seg[lab] = sid
        segments.append({"id": sid, "category_id": int(lab), "isthing": bool(th), "score": float(sc), "area": 0})
    lut = torch.tensor(seg_of_query, dtype=torch.int32, device=device)  # [N] query -> segment id (0 = dropped)
    panoptic_seg = torch.where(winner_fg, lut[winner], panoptic_seg)  # [H, W]
    if segments:
        areas = torch.bincount(panoptic_seg.flatten().long(), minlength=len(segments) + 1).tolist()
        for s in segments:
            s["area"] = int(areas[s["id"]])
    return panoptic_seg, segments


def instance_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    top_k: int = 100,
    is_thing: Optional[Tensor] = None,
    panoptic_mode: bool = True,
) -> Dict[str, Tensor]:
    """Instance segmentation of one image.

    class_logits: [Q, K+1]; mask_logits: [Q, H, W]; is_thing: bool [K].  The ``top_k`` best
    (query, class) pairs are taken first; then, when ``panoptic_mode`` and ``is_thing`` is given (a
    panoptic model scored as instance), only thing classes are kept (so fewer than ``top_k`` may remain).
    Returns ``{"masks": bool [n, H, W], "scores": float [n], "labels": int64 [n] (contiguous)}``,
    ordered by decreasing class probability.
    """
    Q, K1 = class_logits.shape
    K = K1 - 1
    probs = class_logits.float().softmax(-1)[:, :-1]  # [Q, K]
    k = min(top_k, Q * K)
    cls_scores, flat_idx = probs.flatten().topk(k, sorted=True)  # [k]
    labels = flat_idx % K  # [k]
    query = torch.div(flat_idx, K, rounding_mode="floor")  # [k]
    if panoptic_mode and is_thing is not None:
        sel = is_thing.to(labels.device)[labels]  # [k]
        cls_scores, labels, query = cls_scores[sel], labels[sel], query[sel]
    logits = mask_logits[query].float()  # [n, H, W]
    masks = logits > 0
    m = masks.flatten(1).float()
    mask_scores = (logits.sigmoid().flatten(1) * m).sum(1) / (m.sum(1) + 1e-6)  # [n] mean sigmoid in mask
    return {"masks": masks, "scores": cls_scores * mask_scores, "labels": labels.long()}


def resize_mask_logits(
    mask_logits: Tensor, image_size: Tuple[int, int], orig_size: Tuple[int, int], padded_size: Tuple[int, int]
) -> Tensor:
    """Official resizing of one image's mask logits ``[Q, h, w]`` (``h, w`` = 1/4 of ``padded_size``):
    bilinear up to the padded input size, crop to the valid ``image_size``, bilinear to ``orig_size``.
    Returns ``[Q, orig_h, orig_w]`` float32."""
    x = F.interpolate(mask_logits[None].float(), size=tuple(padded_size), mode="bilinear", align_corners=False)
    h, w = int(image_size[0]), int(image_size[1])
    x = x[..., :h, :w]
    oh, ow = int(orig_size[0]), int(orig_size[1])
    if (oh, ow) != (h, w):
        x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
    return x[0]


def _needed_queries(class_logits: Tensor, tasks: Sequence[str], cfg) -> Optional[Tensor]:
    """Indices (ascending) of the queries whose masks ``tasks`` can use, or None for all of them.

    Semantic inference sums over every query.  Panoptic inference uses only the queries it keeps
    (not "no object", score above ``object_mask_threshold``) and instance inference only the queries
    of its ``top_k`` (query, class) pairs; the kept subset in query order gives the same results, so
    the masks of the others need not be upsampled (with a trained model, most of them)."""
    if "semantic" in tasks:
        return None
    Q, K1 = class_logits.shape
    K = K1 - 1
    probs = class_logits.softmax(-1)
    need = torch.zeros(Q, dtype=torch.bool, device=class_logits.device)
    if "panoptic" in tasks:
        scores, labels = probs.max(-1)
        need |= labels.ne(K) & (scores > cfg.object_mask_threshold)
    if "instance" in tasks:
        k = min(cfg.top_k, Q * K)
        flat = probs[:, :-1].flatten().topk(k, sorted=False).indices
        need[torch.div(flat, K, rounding_mode="floor")] = True
    return need.nonzero().squeeze(1)


@torch.no_grad()
def postprocess(
    output,
    image_sizes: Sequence[Tuple[int, int]],
    orig_sizes: Sequence[Tuple[int, int]],
    cfg=None,
    is_thing: Optional[Tensor] = None,
    tasks: Sequence[str] = ("panoptic", "instance", "semantic"),
    padded_size: Optional[Tuple[int, int]] = None,
) -> List[Dict[str, Any]]:
    """Post-process a batch of model outputs.

    output: :class:`m2f.models.outputs.Mask2FormerOutput` (``class_logits [B, Q, K+1]``,
    ``mask_logits [B, Q, Hp/4, Wp/4]``); image_sizes: valid (h, w) of each image inside the padded
    input; orig_sizes: (H, W) to produce results at; cfg: :class:`m2f.config.InferenceCfg` (None =
    defaults); is_thing: bool [K] (or a metadata object with ``is_thing``; None: no thing/stuff
    distinction, nothing merged, no instance filtering); padded_size: padded input (Hp, Wp), default 4x the mask size.

    Returns one dict per image with the requested keys:
    ``"sem_seg"`` float [K, H, W]; ``"panoptic_seg"`` ``(int32 [H, W], segments_info)``;
    ``"instances"`` ``{"masks" bool [n, H, W], "scores" [n], "labels" [n]}``.
    """
    if is_thing is not None and hasattr(is_thing, "is_thing"):  # a dataset metadata object
        is_thing = torch.as_tensor(list(is_thing.is_thing), dtype=torch.bool)
    if cfg is None:
        from m2f.config import InferenceCfg

        cfg = InferenceCfg()
    unknown = set(tasks) - {"panoptic", "instance", "semantic"}
    if unknown:
        raise ValueError(f"postprocess: unknown tasks {sorted(unknown)}; expected panoptic/instance/semantic")
    class_logits, mask_logits = output.class_logits, output.mask_logits  # [B, Q, K+1], [B, Q, h, w]
    if padded_size is None:
        padded_size = (mask_logits.shape[-2] * 4, mask_logits.shape[-1] * 4)
    results = []
    for b, (isz, osz) in enumerate(zip(image_sizes, orig_sizes)):
        h, w = int(isz[0]), int(isz[1])
        oh, ow = int(osz[0]), int(osz[1])
        c = class_logits[b].float()  # [Q, K+1]
        # Upsample only the queries the requested tasks can use (all of them for semantic).
        sel = _needed_queries(c, tasks, cfg)
        src = mask_logits[b : b + 1] if sel is None else mask_logits[b : b + 1, sel]
        if src.shape[1] == 0:  # nothing to upsample (interpolate rejects empty inputs)
            m = src.new_zeros((0, oh, ow), dtype=torch.float32)
        else:
            m = F.interpolate(src.float(), size=tuple(padded_size), mode="bilinear", align_corners=False)
            m = m[:, :, :h, :w]  # [1, Q', h, w]
            if (oh, ow) != (h, w):
                m = F.interpolate(m, size=(oh, ow), mode="bilinear", align_corners=False)
            m = m[0]  # [Q', oh, ow]
        if sel is not None:
            c = c[sel]
        r: Dict[str, Any] = {}
        if "semantic" in tasks:
            r["sem_seg"] = semantic_inference(c, m)
        if "panoptic" in tasks:
            r["panoptic_seg"] = panoptic_inference(c, m, cfg.object_mask_threshold, cfg.overlap_threshold, is_thing)
        if "instance" in tasks:
            r["instances"] = instance_inference(c, m, cfg.top_k, is_thing, panoptic_mode=is_thing is not None)
        results.append(r)
    return results
