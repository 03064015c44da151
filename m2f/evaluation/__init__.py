"""Evaluation: PQ (panoptic), mask AP and class-agnostic AR@100 (instance), mIoU (semantic).

Two engines, same numbers: ``"hotcoco"`` (default, fast Rust implementations) and ``"reference"``
(panopticapi's matcher, pycocotools COCOeval, a numpy confusion matrix).  All metrics on the 0-100
scale (detectron2's).  Bad input raises :class:`m2f.errors.InputError` naming the file.

- :func:`evaluate_panoptic`, :func:`evaluate_instances`, :func:`proposal_recall`, :func:`evaluate_semantic`
- dataset evaluators :class:`PanopticEvaluator`, :class:`InstanceEvaluator`, :class:`SemanticEvaluator`
- writers :func:`write_panoptic_predictions`, :func:`instances_to_coco_results`, :func:`write_semantic_png`,
  :func:`panoptic_to_png` / :func:`rgb2id`
- :mod:`m2f.evaluation.score`: the ``m2f score`` command.
"""
from m2f.evaluation._io import panoptic_to_png, rgb2id
from m2f.evaluation.evaluators import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator
from m2f.evaluation.instance import AP_KEYS, evaluate_instances, instances_to_coco_results, proposal_recall
from m2f.evaluation.panoptic import ENGINES, PQ_KEYS, evaluate_panoptic, validate_panoptic, write_panoptic_predictions
from m2f.evaluation.semantic import evaluate_semantic, metrics_from_confusion, write_semantic_png

__all__ = [
    "ENGINES", "PQ_KEYS", "AP_KEYS",
    "evaluate_panoptic", "validate_panoptic", "evaluate_instances", "proposal_recall", "evaluate_semantic",
    "metrics_from_confusion", "PanopticEvaluator", "InstanceEvaluator", "SemanticEvaluator",
    "write_panoptic_predictions", "instances_to_coco_results", "write_semantic_png", "panoptic_to_png", "rgb2id",
]
