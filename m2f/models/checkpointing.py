"""Activation checkpointing for the repeated blocks of the backbone and the pixel decoder.

A module that supports it has a boolean attribute ``activation_checkpointing`` (False by default)
and runs its blocks through :func:`run_block`; :func:`set_activation_checkpointing` switches every
such module under a root (the builder calls it from ``backbone.activation_checkpointing`` /
``pixel_decoder.activation_checkpointing``).  Non-reentrant ``torch.utils.checkpoint``: works with
autocast, DDP and modules whose parameters are frozen, and restores the RNG state so dropout /
drop-path recompute the same masks -- outputs and gradients are those of the plain forward.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from m2f.errors import InputError


def run_block(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, checkpointed when ``enabled`` and autograd is recording (training)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def set_activation_checkpointing(root: nn.Module, enabled: bool, field: str) -> int:
    """Set ``activation_checkpointing`` on every module under ``root`` that has it; returns how many.
    Switching it on for a module without any is an InputError naming ``field``."""
    n = 0
    for m in root.modules():
        if isinstance(getattr(m, "activation_checkpointing", None), bool):
            m.activation_checkpointing = enabled
            n += 1
    if enabled and n == 0:
        raise InputError(f"{field}: {type(root).__name__} has no blocks to checkpoint; switch it off for this "
                         "kind (supported: ResNet and Swin backbones, msdeform and transformer_encoder pixel decoders)")
    return n
