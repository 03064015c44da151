"""Evaluate a model or a checkpoint on a dataset (``m2f eval``), and write predictions for images
(``m2f predict``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from m2f.config import Config, apply_overrides, from_dict
from m2f.errors import InputError

ALL_TASKS = ("panoptic", "instance", "semantic")


def tasks_for(cfg: Config, metadata, requested: str = "all") -> List[str]:
    """Tasks a model trained for ``cfg.data.task`` can be scored on with this dataset's ground truth.
    A panoptic model is scored as panoptic, instance and semantic (paper Table 7)."""
    trained = cfg.data.task
    possible = {"panoptic": list(ALL_TASKS), "instance": ["instance"], "semantic": ["semantic"]}[trained]
    have = {"panoptic": getattr(metadata, "panoptic_json", None) is not None,
            "instance": getattr(metadata, "instances_json", None) is not None,
            "semantic": getattr(metadata, "sem_seg_dir", None) is not None}
    tasks = [t for t in possible if have[t]]
    if requested != "all":
        if requested not in possible:
            raise InputError(f"--task {requested}: a model trained for {trained} cannot be scored as {requested}")
        if not have[requested]:
            raise InputError(f"--task {requested}: the dataset has no {requested} ground truth")
        tasks = [requested]
    return tasks


def _is_thing(metadata, device) -> torch.Tensor:
    return torch.as_tensor(list(metadata.is_thing), dtype=torch.bool, device=device)


@torch.no_grad()
def proposals_per_layer(output, image_sizes, orig_sizes, top_k: int = 100) -> List[List[Dict[str, Any]]]:
    """Class-agnostic proposals of every prediction (paper Fig 3): for prediction ``l`` and image ``b``,
    the ``top_k`` queries ranked by (1 - p(no object)) x mean sigmoid inside the binary mask."""
    from pycocotools import mask as mask_util

    per_layer = []
    for pred in output.predictions():
        layer = []
        for b, ((h, w), (oh, ow)) in enumerate(zip(image_sizes, orig_sizes)):
            logits = pred.mask_logits[b : b + 1]
            logits = F.interpolate(logits, size=output.mask_logits.shape[-2:] , mode="bilinear", align_corners=False)
            logits = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)[..., :h, :w]
            logits = F.interpolate(logits, size=(oh, ow), mode="bilinear", align_corners=False)[0]
            prob = pred.class_logits[b].softmax(-1)
            obj = 1.0 - prob[:, -1]
            masks = logits > 0
            mscore = (logits.sigmoid() * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
            score = obj * mscore
            k = min(top_k, score.numel())
            top = score.topk(k).indices
            rles = mask_util.encode(np.asfortranarray(masks[top].permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
            layer.append([{"score": float(score[i]), "segmentation": r} for i, r in zip(top.tolist(), rles)])
        per_layer.append(layer)
    return per_layer


EVAL_BATCH = 8  # images per forward in evaluation (only images of one size share a batch)


def same_size_batches(ds, batch_size: int) -> Iterable[List[Dict[str, Any]]]:
    """The items of ``ds`` in order (each loaded once), in batches of at most ``batch_size``
    consecutive images of the SAME size: no image is padded for another one, so every image's
    prediction is the one it gets alone (batch 1) up to float summation order, and evaluation runs
    fewer small operations."""
    batch: List[Dict[str, Any]] = []
    for i in range(len(ds)):
        item = ds[i]
        if batch and (len(batch) == batch_size or item["image"].shape[-2:] != batch[0]["image"].shape[-2:]):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@torch.no_grad()
def evaluate_model(model, cfg: Config, device=None, limit: Optional[int] = None, task: str = "all",
                   engine: str = "hotcoco", dataset=None, proposals: bool = False, batch_size: int = EVAL_BATCH
                   ) -> Dict[str, Any]:
    """Run ``model`` over the validation set of ``cfg.data.val`` and score it.
    Returns ``{task: metrics}`` (+ ``"proposals": {"AR@100_layer{l}": ...}`` when ``proposals``).
    ``batch_size``: images per forward, only images of one size together (:func:`same_size_batches`)."""
    from functools import partial

    from m2f.data.catalog import get_dataset
    from m2f.data.collate import collate
    from m2f.evaluation import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator
    from m2f.inference import postprocess

    device = torch.device(device) if device is not None else next(model.parameters()).device
    ds = dataset if dataset is not None else get_dataset(cfg.data.val, "val", cfg)
    md = ds.metadata
    if md.num_classes != cfg.num_classes:
        raise InputError(f"the evaluation data {cfg.data.val!r} has {md.num_classes} classes but the model "
                         f"predicts num_classes={cfg.num_classes}; evaluate on data with the training classes")
    tasks = tasks_for(cfg, md, task)
    if limit is not None:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    if batch_size < 1:
        raise InputError(f"evaluation batch_size: expected >= 1, got {batch_size}")
    col = partial(collate, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
                  size_divisibility=cfg.data.size_divisibility)
    loader = (col(items) for items in same_size_batches(ds, batch_size))
    evaluators = {}
    if "panoptic" in tasks:
        evaluators["panoptic"] = PanopticEvaluator(md)
    if "instance" in tasks:
        evaluators["instance"] = InstanceEvaluator(md)
    if "semantic" in tasks:
        evaluators["semantic"] = SemanticEvaluator(md)
    is_thing = _is_thing(md, device)
    layer_results: List[List[Dict[str, Any]]] = []
    was_training = model.training
    model.eval()
    for batch in loader:
        images = batch["images"].to(device)
        output = model(images)
        orig_sizes = [tuple(m["orig_size"]) for m in batch["meta"]]
        results = postprocess(output, batch["image_sizes"], orig_sizes, cfg.inference, is_thing, tasks=tuple(tasks))
        for meta, r in zip(batch["meta"], results):
            for ev in evaluators.values():
                ev.process(meta, r)
        if proposals:
            per_layer = proposals_per_layer(output, batch["image_sizes"], orig_sizes)
            if not layer_results:
                layer_results = [[] for _ in per_layer]
            for l, layer in enumerate(per_layer):
                for meta, props in zip(batch["meta"], layer):
                    for p in props:
                        layer_results[l].append({"image_id": meta["image_id"], "category_id": 1, **p})
    model.train(was_training)
    res: Dict[str, Any] = {t: ev.evaluate(engine=engine) for t, ev in evaluators.items()}
    if proposals and layer_results:
        from m2f.evaluation import proposal_recall

        res["proposals"] = {f"AR@100_layer{l}": proposal_recall(md.instances_json, r, max_dets=100)
                            for l, r in enumerate(layer_results)}
    return res


def load_model_from_checkpoint(path, device=None, overrides: Iterable[str] = (), trust: bool = False):
    """(model in eval mode on ``device``, config) from an m2f checkpoint (weights-only; ``trust``: see
    :func:`m2f.checkpoint.load_checkpoint`)."""
    model, cfg, _ = load_checkpoint_for_inference(path, device, overrides, trust)
    return model, cfg


def checkpoint_metadata(path, record) -> "DatasetMetadata":
    """The training data's metadata from a checkpoint's ``"data"`` record (see
    :func:`m2f.train.data_record`): categories in contiguous order, thing / stuff split, colours."""
    from m2f.data.metadata import DatasetMetadata

    cats = record.get("categories") if isinstance(record, dict) else None
    if not isinstance(cats, list) or not cats or not all(isinstance(c, dict) and "id" in c for c in cats):
        raise InputError(f"checkpoint {path}: its 'data' record has no list of categories with ids")
    return DatasetMetadata.from_categories(cats, sort_by_id=False, name=str(record.get("spec", "")))


def load_checkpoint_for_inference(path, device=None, overrides: Iterable[str] = (), trust: bool = False):
    """(model in eval mode on ``device``, config, metadata of the training data or None) from an m2f
    checkpoint.  The metadata comes from the checkpoint's ``"data"`` record (None for a checkpoint
    without one, e.g. converted from detectron2)."""
    from m2f.checkpoint import load_checkpoint, load_model_weights
    from m2f.config import ConfigError
    from m2f.models.build import build_model

    ckpt = load_checkpoint(path, trust=trust)
    try:
        cfg = from_dict(ckpt["config"])
    except ConfigError as e:
        raise InputError(f"checkpoint {path}: its 'config' is not a valid m2f config ({e})") from None
    if overrides:
        cfg = apply_overrides(cfg, list(overrides))
    model = build_model(cfg)
    preset = ckpt.get("preset")
    load_model_weights(model, ckpt["model"], str(path),
                       f"the checkpoint's config" + (f" (preset {preset})" if preset else "")
                       + (f" with --set {' '.join(overrides)}" if overrides else ""))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    md = checkpoint_metadata(path, ckpt["data"]) if ckpt.get("data") is not None else None
    if md is not None and md.num_classes != cfg.num_classes:
        raise InputError(f"checkpoint {path}: its data record has {md.num_classes} classes but its config "
                         f"num_classes={cfg.num_classes}")
    return model.to(dev).eval(), cfg, md


def evaluate_checkpoint(ckpt, data: Optional[str] = None, task: str = "all", engine: str = "hotcoco", device=None,
                        overrides: Sequence[str] = (), limit: Optional[int] = None,
                        trust: bool = False) -> Dict[str, Any]:
    model, cfg = load_model_from_checkpoint(ckpt, device, overrides, trust=trust)
    if data:
        cfg = apply_overrides(cfg, {"data.val": data})
    return evaluate_model(model, cfg, limit=limit, task=task, engine=engine)


@torch.no_grad()
def predict_images(ckpt, images: Sequence[str], out_dir, device=None, task: Optional[str] = None,
                   trust: bool = False) -> Dict[str, Any]:
    """Predict ``images`` with a checkpoint; write COCO-format predictions and overlay PNGs to ``out_dir``:
    panoptic ``panoptic_predictions.json`` + ``IMAGE_panoptic.png``; instance ``predictions_coco.json`` (a
    COCO results list: ``image_id`` = the image's index in ``images``, dataset ``category_id``, RLE
    ``segmentation``, ``score``) + ``predictions_images.json`` (its ``images`` and ``categories``, so
    ``COCO("predictions_images.json").loadRes("predictions_coco.json")`` reads it); semantic
    ``IMAGE_semantic.png``.  Always ``IMAGE_overlay.png``.
    ``task`` None: the task the checkpoint was trained for (``cfg.data.task``)."""
    from PIL import Image

    from m2f.checkpoint import atomic_write_json
    from m2f.data.catalog import get_dataset
    from m2f.inference import postprocess
    from m2f.viz import overlay_instances, overlay_panoptic, overlay_semantic

    model, cfg, md = load_checkpoint_for_inference(ckpt, device, trust=trust)
    task = task or cfg.data.task
    dev = next(model.parameters()).device
    if md is None:  # a checkpoint without a data record (converted): the classes of its validation set
        md = get_dataset(cfg.data.val, "val", cfg).metadata
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_thing = _is_thing(md, dev)
    written = {"overlays": [], "predictions": None}
    pan_records, inst_records, image_records = [], [], []
    from m2f.evaluation import instances_to_coco_results

    for i, path in enumerate(images):
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: no such image file")
        try:
            img = np.array(Image.open(p).convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{p}: cannot be read as an image ({e})") from None
        t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        x, sizes = model.preprocess([t])
        output = model(x.to(dev))
        r = postprocess(output, sizes, [img.shape[:2]], cfg.inference, is_thing, tasks=(task,))[0]
        stem = p.stem
        image_records.append({"id": i, "file_name": str(p), "height": int(img.shape[0]), "width": int(img.shape[1])})
        if task == "panoptic":
            seg, info = r["panoptic_seg"]
            from m2f.evaluation import panoptic_to_png

            Image.fromarray(panoptic_to_png(seg.cpu().numpy())).save(out / f"{stem}_panoptic.png")
            segs = [{**s, "category_id": md.contiguous_to_id[s["category_id"]]} for s in info]
            pan_records.append({"image_id": i, "file_name": f"{stem}_panoptic.png", "source": str(p),
                                "segments_info": segs})
            ov = overlay_panoptic(img, seg.cpu().numpy(), info, md)
        elif task == "instance":
            inst = r["instances"]
            inst_records += instances_to_coco_results(inst, i, md.contiguous_to_id)
            ov = overlay_instances(img, inst, md)
        else:
            sem = r["sem_seg"].argmax(0).to(torch.uint8).cpu().numpy()
            Image.fromarray(sem).save(out / f"{stem}_semantic.png")
            ov = overlay_semantic(img, sem, md)
        ov.save(out / f"{stem}_overlay.png")
        written["overlays"].append(str(out / f"{stem}_overlay.png"))
    if task == "panoptic":
        atomic_write_json(out / "panoptic_predictions.json", {"annotations": pan_records,
                                                               "categories": list(md.categories)})
        written["predictions"] = str(out / "panoptic_predictions.json")
    elif task == "instance":  # COCO results (pycocotools' loadRes / m2f score --task instance) + their images
        atomic_write_json(out / "predictions_coco.json", inst_records)
        atomic_write_json(out / "predictions_images.json", {"images": image_records,
                                                            "categories": list(md.categories)})
        written["predictions"] = str(out / "predictions_coco.json")
        written["images"] = str(out / "predictions_images.json")
    return written
