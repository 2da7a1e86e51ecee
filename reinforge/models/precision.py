"""The one table of model precisions: a recipe's `precision` runs a model's forward under autocast.

Weights stay float32; float32 means no autocast at all (the bit-exact CPU path the tests and
golden outputs use).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: str | torch.device, precision: str):
    """The context a forward pass runs in at this precision on this device."""
    if precision == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])
