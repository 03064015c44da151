"""Activation checkpointing for the repeated blocks of the backbone and the pixel decoder.

A module that supports it takes ``activation_checkpointing`` as a constructor argument (False by
default; the builder passes ``backbone.activation_checkpointing`` / ``pixel_decoder.activation_checkpointing``),
keeps it as a boolean attribute, and runs its blocks through :func:`run_block`.  Non-reentrant ``torch.utils.checkpoint``: works with
autocast, DDP and modules whose parameters are frozen, and restores the RNG state so dropout /
drop-path recompute the same masks -- outputs and gradients are those of the plain forward.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint



def run_block(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, checkpointed when ``enabled`` and autograd is recording (training)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
