"""Inference post-processing vs HF transformers' Mask2FormerImageProcessor (external reference) and
vs the official definitions where HF deviates.

Known, deliberate differences of HF from the official Mask2Former code (checked below):
- HF always resizes mask logits to 384x384 first: we feed logits already at 384x384 and pass
  ``target_sizes=(384, 384)`` so that both resizes are the identity.
- panoptic: HF paints every pixel a query wins in the score-weighted argmax; the official code paints
  only the won pixels where that query's own mask prob is >= 0.5 (others stay void, 0). HF drops a
  segment when ratio <= overlap threshold, official when ratio < threshold (we avoid exact ties).
- instance: HF takes top-``num_queries`` (official: top-100), drops empty masks and filters
  ``score >= threshold`` (we use threshold 0); HF has no thing-only filtering for panoptic models.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from m2f.config import InferenceCfg
from m2f.inference import instance_inference, panoptic_inference, postprocess, semantic_inference
from m2f.models.outputs import Mask2FormerOutput

S = 384  # HF's fixed internal size


@pytest.fixture(scope="module")
def hf():
    import transformers

    return transformers.Mask2FormerImageProcessor()


def _hf_out(cls, masks):
    return SimpleNamespace(class_queries_logits=cls[None], masks_queries_logits=masks[None])


def craft_logits(K=5, Q=8):
    """Unambiguous logits: 4 confident queries with disjoint boxes, the rest "no object"."""
    cls = torch.full((Q, K + 1), -10.0)
    cls[:, K] = 10.0  # no object
    masks = torch.full((Q, S, S), -8.0)
    boxes = [(0, 0, 200, 200, 0), (0, 200, 200, S, 1), (200, 0, S, S, 3), (210, 10, 300, 100, 3)]
    for q, (y0, x0, y1, x1, c) in enumerate(boxes):
        cls[q] = -10.0
        cls[q, c] = 10.0
        masks[q, y0:y1, x0:x1] = 8.0
    # queries 2 and 3 are both of stuff class 3 (overlapping): merged into one segment
    return cls, masks


def random_logits(seed, K=6, Q=12, confident=False):
    """Random but segment-like: each query prefers one cell of a random Voronoi partition, plus smooth
    noise (so queries overlap, some lose most of their mask, some pixels are won below 0.5).
    ``confident``: ~70 % of the queries have class prob exactly 1.0 (float32) for a random label
    (possibly "no object"), the others max prob < 0.5."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(Q, K + 1, generator=g) * 3
    if confident:
        conf = torch.rand(Q, generator=g) < 0.7
        lab = torch.randint(0, K + 1, (Q,), generator=g)
        cls = torch.where(conf[:, None], -10.0 + 40.0 * torch.nn.functional.one_hot(lab, K + 1), cls * 0.1)
    centres = torch.rand(Q, 2, generator=g) * S
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    d = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2  # [Q, S, S]
    cell = torch.nn.functional.one_hot(d.argmin(0), Q).permute(2, 0, 1).float()  # [Q, S, S]
    low = torch.randn(Q, 1, 12, 12, generator=g) * 2
    noise = torch.nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    return cls, 6 * cell - 3 + noise


def _relabel_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if two segment maps are equal up to a bijective relabelling of ids."""
    a, b = a.flatten().long(), b.flatten().long()
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return len(torch.unique(pairs[0])) == pairs.shape[1] == len(torch.unique(pairs[1]))


# ----------------------------------------------------------------------------------------------
def test_semantic_matches_hf(hf):
    for cls, masks in [craft_logits(), random_logits(0), random_logits(1)]:
        ours = semantic_inference(cls, masks)
        ref = hf.post_process_semantic_segmentation(_hf_out(cls, masks), target_sizes=[(S, S)],
                                                    return_segmentation_scores=True)[0]
        assert ours.shape == (cls.shape[1] - 1, S, S)
        torch.testing.assert_close(ours, ref.segmentation_scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(ours.argmax(0), ref.segmentation)


def test_panoptic_craft_exact(hf):
    cls, masks = craft_logits()
    is_thing = torch.tensor([True, True, False, False, False])
    seg, info = panoptic_inference(cls, masks, 0.8, 0.8, is_thing)
    assert seg.dtype == torch.int32 and seg.shape == (S, S)
    assert [(s["category_id"], s["isthing"]) for s in info] == [(0, True), (1, True), (3, False)]
    assert [s["id"] for s in info] == [1, 2, 3]
    assert seg[0, 0] == 1 and seg[0, S - 1] == 2 and seg[S - 1, 0] == 3 and seg[250, 50] == 3
    assert [s["area"] for s in info] == [200 * 200, 200 * (S - 200), (S - 200) * S]
    assert (seg == 0).sum() == 0
    for s in info:
        assert s["score"] == pytest.approx(torch.softmax(torch.tensor([10.0] + [-10.0] * 5), 0)[0].item())
    ref = hf.post_process_panoptic_segmentation(_hf_out(cls, masks), threshold=0.8, overlap_mask_area_threshold=0.8,
                                                label_ids_to_fuse={2, 3, 4}, target_sizes=[(S, S)])[0]
    assert torch.equal(seg, ref["segmentation"].to(torch.int32))
    assert [(s["id"], s["label_id"]) for s in ref["segments_info"]] == [(s["id"], s["category_id"]) for s in info]


def test_panoptic_overlap_drop_and_void():
    K, Q = 3, 3
    cls = torch.full((Q, K + 1), -10.0)
    cls[0, 0] = 10.0  # big confident query
    cls[1, 1] = 5.0  # lower score query, mostly hidden behind query 0 -> dropped (visible 25 % < 80 %)
    cls[2, 3] = 10.0  # no object
    masks = torch.full((Q, 20, 20), -5.0)
    masks[0, :, :10] = 5.0
    masks[1, :, 5:15] = 5.0
    masks[2] = 5.0
    seg, info = panoptic_inference(cls, masks, 0.5, 0.8, torch.tensor([True, True, True]))
    assert [s["category_id"] for s in info] == [0]
    assert (seg[:, :10] == 1).all() and (seg[:, 10:] == 0).all()  # query 1's won pixels are void
    seg, info = panoptic_inference(cls, masks, 0.5, 0.2, torch.tensor([True, True, True]))
    assert [s["category_id"] for s in info] == [0, 1] and (seg[:, 10:15] == 2).all() and (seg[:, 15:] == 0).all()
    # nothing above threshold -> all void
    seg, info = panoptic_inference(cls, masks, 0.99999999, 0.8)
    assert info == [] and (seg == 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_random_vs_hf(hf, seed):
    """Two HF deviations are neutralised here and tested against the official definition elsewhere:
    (1) HF computes a query's mask area on score-weighted probs (score * prob >= 0.5; official:
    prob >= 0.5): kept queries here have class prob exactly 1.0, where the two coincide;
    (2) after fusing a stuff segment HF resets its id counter, so later segments can reuse an existing
    id: here every class is a thing (no fusion); fusion is checked against a loop reference.
    Everything else (selection, argmax, overlap test, ids, scores) must match, and the painted
    pixels too, except that HF also paints won pixels whose prob < 0.5 (official: void)."""
    cls, masks = random_logits(seed, confident=True)
    K = cls.shape[1] - 1
    thr, ovl = 0.8, (0.8 if seed % 2 else 0.5) + 1e-7  # no exact ratio ties
    top = cls.softmax(-1).max(-1).values
    assert (top[top > thr] == 1.0).all()
    seg, info = panoptic_inference(cls, masks, thr, ovl, None)
    ref = hf.post_process_panoptic_segmentation(_hf_out(cls, masks.clone()), threshold=thr,
                                                overlap_mask_area_threshold=ovl, label_ids_to_fuse=set(),
                                                target_sizes=[(S, S)])[0]
    hseg = ref["segmentation"].to(torch.int32)
    assert [(s["id"], s["category_id"]) for s in info] == [(s["id"], s["label_id"]) for s in ref["segments_info"]]
    for a, b in zip(info, ref["segments_info"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    painted = seg > 0
    assert torch.equal(seg[painted], hseg[painted])
    # HF's extra pixels are exactly the won pixels of surviving segments whose winner prob is < 0.5
    extra = (seg == 0) & (hseg > 0)
    scores, labels = cls.softmax(-1).max(-1)
    keep = (labels != K) & (scores > thr)
    prob = masks[keep].sigmoid()
    winner = (scores[keep].view(-1, 1, 1) * prob).argmax(0)
    wprob = prob.gather(0, winner[None])[0]
    kept_ids = torch.tensor([s["id"] for s in info] or [-1])
    assert torch.equal(extra, (wprob < 0.5) & torch.isin(hseg, kept_ids))
    assert [s["area"] for s in info] == [int((seg == s["id"]).sum()) for s in info]
    assert len(info) >= 2 and (seg == 0).any() and extra.any()  # the case is not trivial


def _loop_reference_panoptic(cls, masks, thr, ovl, is_thing):
    """A plain per-query loop over the official definition (readable reference for the vectorised code)."""
    K = cls.shape[1] - 1
    scores, labels = cls.softmax(-1).max(-1)
    keep = (labels != K) & (scores > thr)
    sc, lab, prob = scores[keep], labels[keep], masks[keep].sigmoid()
    seg = torch.zeros(masks.shape[1:], dtype=torch.int32)
    info, stuff = [], {}
    if len(sc) == 0:
        return seg, info
    won = (sc.view(-1, 1, 1) * prob).argmax(0)
    for k in range(len(sc)):
        area = int((won == k).sum())
        orig = int((prob[k] >= 0.5).sum())
        paint = (won == k) & (prob[k] >= 0.5)
        if area == 0 or orig == 0 or int(paint.sum()) == 0 or area / orig < ovl:
            continue
        c, th = int(lab[k]), bool(is_thing[lab[k]])
        if not th and c in stuff:
            seg[paint] = stuff[c]
            continue
        sid = len(info) + 1
        if not th:
            stuff[c] = sid
        seg[paint] = sid
        info.append({"id": sid, "category_id": c, "isthing": th, "score": float(sc[k])})
    return seg, info


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_random_vs_loop_reference_with_fusion(seed):
    cls, masks = random_logits(seed + 100, confident=seed % 2 == 0)
    if seed % 2:
        cls = cls * 0.3  # soft scores: score * prob != prob
    K = cls.shape[1] - 1
    is_thing = torch.arange(K) < 2
    thr = 0.8 if seed % 2 == 0 else 0.25
    seg, info = panoptic_inference(cls, masks, thr, 0.6 + 1e-7, is_thing)
    rseg, rinfo = _loop_reference_panoptic(cls, masks, thr, 0.6 + 1e-7, is_thing)
    assert torch.equal(seg, rseg)
    assert [{k: v for k, v in s.items() if k != "area"} for s in info] == rinfo
    assert len(info) >= 2


@pytest.mark.parametrize("seed", range(4))
def test_instance_random_vs_hf(hf, seed):
    cls, masks = random_logits(seed + 10)
    Q = cls.shape[0]
    ours = instance_inference(cls, masks, top_k=Q)  # HF uses top-num_queries
    ref = hf.post_process_instance_segmentation(_hf_out(cls, masks), threshold=0.0, target_sizes=[(S, S)],
                                                return_binary_maps=True)[0]
    nonempty = ours["masks"].flatten(1).any(1)  # HF drops empty masks
    assert len(ref["segments_info"]) == int(nonempty.sum())
    ours_rows = sorted(zip(ours["labels"][nonempty].tolist(), ours["scores"][nonempty].tolist(),
                           ours["masks"][nonempty].flatten(1).sum(1).tolist()))
    hf_maps = ref["segmentation"] if ref["segments_info"] else torch.zeros(0, S, S)
    hf_rows = sorted((s["label_id"], s["score"], int(hf_maps[i].sum())) for i, s in enumerate(ref["segments_info"]))
    for a, b in zip(ours_rows, hf_rows):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], abs=2e-6) and a[2] == b[2]


def test_instance_official_definition():
    """Top-k over query x class, thing-only filter after top-k, score = prob x mean sigmoid in mask."""
    cls, masks = random_logits(3, K=6, Q=12)
    is_thing = torch.tensor([True, False, True, False, True, False])
    r = instance_inference(cls, masks, top_k=20, is_thing=is_thing)
    probs = cls.softmax(-1)[:, :-1]
    top = probs.flatten().topk(20).indices
    q, k = (top // 6), (top % 6)
    sel = is_thing[k]
    assert r["labels"].tolist() == k[sel].tolist()
    m = masks[q[sel]]
    exp = probs[q[sel], k[sel]] * torch.stack([mi.sigmoid()[mi > 0].mean() if (mi > 0).any() else torch.tensor(0.)
                                                for mi in m])
    torch.testing.assert_close(r["scores"], exp, rtol=1e-5, atol=1e-6)
    assert torch.equal(r["masks"], m > 0)
    r2 = instance_inference(cls, masks, top_k=20, is_thing=is_thing, panoptic_mode=False)
    assert len(r2["labels"]) == 20
    r3 = instance_inference(cls, masks, top_k=1000)
    assert len(r3["labels"]) == 12 * 6


def test_postprocess_resize_crop():
    B, Q, K = 2, 5, 4
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(B, Q, K + 1, generator=g)
    ml = torch.randn(B, Q, 16, 16, generator=g)  # padded input 64x64
    out = Mask2FormerOutput(class_logits=cls, mask_logits=ml)
    sizes, orig = [(64, 48), (40, 64)], [(128, 96), (40, 64)]
    res = postprocess(out, sizes, orig, InferenceCfg(object_mask_threshold=0.2), torch.tensor([1, 1, 0, 0]).bool())
    for b in range(B):
        up = torch.nn.functional.interpolate(ml[b : b + 1], size=(64, 64), mode="bilinear", align_corners=False)
        up = up[..., : sizes[b][0], : sizes[b][1]]
        up = torch.nn.functional.interpolate(up, size=orig[b], mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(res[b]["sem_seg"], semantic_inference(cls[b], up))
        seg, info = res[b]["panoptic_seg"]
        seg2, info2 = panoptic_inference(cls[b], up, 0.2, 0.8, torch.tensor([1, 1, 0, 0]).bool())
        assert torch.equal(seg, seg2) and info == info2 and seg.shape == orig[b]
        assert res[b]["instances"]["masks"].shape[1:] == orig[b]
        assert set(res[b]["instances"]["labels"].tolist()) <= {0, 1}
    only = postprocess(out, sizes, orig, None, None, tasks=("semantic",))
    assert set(only[0]) == {"sem_seg"}
    with pytest.raises(ValueError):
        postprocess(out, sizes, orig, None, None, tasks=("bogus",))


@pytest.mark.parametrize("tasks", [("panoptic",), ("instance",), ("panoptic", "instance")])
def test_postprocess_query_subset_equals_all_queries(tasks):
    """Without semantic, only the queries panoptic keeps / instance's top-k pairs use are upsampled:
    the results equal those computed from every query's upsampled mask."""
    B, Q, K = 2, 30, 6
    g = torch.Generator().manual_seed(5)
    cls = torch.randn(B, Q, K + 1, generator=g) * 6
    ml = torch.randn(B, Q, 16, 16, generator=g) * 4
    out = Mask2FormerOutput(class_logits=cls, mask_logits=ml)
    sizes, orig = [(64, 48), (40, 64)], [(128, 96), (40, 64)]
    cfg = InferenceCfg(object_mask_threshold=0.5, overlap_threshold=0.2, top_k=25)
    is_thing = torch.tensor([1, 1, 1, 0, 0, 0]).bool()
    sub = postprocess(out, sizes, orig, cfg, is_thing, tasks=tasks)
    full = postprocess(out, sizes, orig, cfg, is_thing, tasks=(*tasks, "semantic"))
    kept = 0
    for a, b in zip(sub, full):
        if "panoptic" in tasks:
            assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
            assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
            kept += len(a["panoptic_seg"][1])
        if "instance" in tasks:
            for key in ("masks", "labels"):
                assert torch.equal(a["instances"][key], b["instances"][key]), key
            # mask scores are means over pixels: summation order may differ in the last bit
            torch.testing.assert_close(a["instances"]["scores"], b["instances"]["scores"], rtol=1e-6, atol=0)
            kept += len(a["instances"]["labels"])
    assert kept > 0
    # nothing kept at all: empty results, no error
    none = postprocess(out, sizes, orig, InferenceCfg(object_mask_threshold=1.0), is_thing, tasks=("panoptic",))
    assert none[0]["panoptic_seg"][1] == [] and int(none[0]["panoptic_seg"][0].abs().sum()) == 0
