"""GGUF block grids: whether fp32 weights are llama.cpp Q4_0/Q4_1/Q8_0 blocks dequantized, and those blocks.

A model converted from a GGUF file (transformers' gguf loader, or the embedded SmolLM2) keeps each
32-block of a row on the grid d*q + m (Q4_1; Q4_0 is m = -8d) or d*q (Q8_0). Found here by arithmetic
on the weights, so any such source is recognised, whoever converted it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

GGUF_BLOCK = 32  # llama.cpp's Q4_0 / Q4_1 / Q8_0 block
GGUF_BLOCK_SIZES = (16, 32)  # MatMulNBits blocks that hold a 32-block exactly
_TOLERANCE = 1e-2  # in grid steps: a weight off its grid by more is not on it (fp32 rounding is ~1e-5)


class NotOnGrid(ValueError):
    """The model's weights are not on a GGUF block grid."""


@dataclass
class Grid4:
    q: np.ndarray  # uint8 [K, N], 0..15
    scale: np.ndarray  # float32 [K/32, N]
    minimum: np.ndarray  # float32 [K/32, N]


@dataclass
class Grid8:
    q: np.ndarray  # int16 [K, N], -127..127
    scale: np.ndarray  # float32 [K/32, N]


def _blocks(w: np.ndarray) -> np.ndarray:
    k, n = w.shape
    return w.reshape(k // GGUF_BLOCK, GGUF_BLOCK, n)


def grid4(w: np.ndarray) -> Optional[Grid4]:
    """W as d*q + m per 32-block with q in 0..15, or None. A block spanning fewer than 16 levels
    (its extremes not at q=0 and 15) is found with the largest step that fits it."""
    if w.ndim != 2 or w.shape[0] % GGUF_BLOCK:
        return None
    b = _blocks(w.astype(np.float32))
    low, span = b.min(1), b.max(1) - b.min(1)
    scale = np.zeros_like(low)
    found = span == 0
    for levels in range(15, 0, -1):
        step = span / levels
        with np.errstate(divide="ignore", invalid="ignore"):
            q = (b - low[:, None]) / step[:, None]
        fits = (np.abs(q - np.round(q)) < _TOLERANCE).all(1) & ~found
        scale[fits], found = step[fits], found | fits
        if found.all():
            break
    if not found.all():
        return None
    safe = np.where(scale > 0, scale, 1)
    q = np.round((b - low[:, None]) / safe[:, None])
    return Grid4(q.reshape(w.shape).astype(np.uint8), scale, low)


def grid8(w: np.ndarray) -> Optional[Grid8]:
    """W as d*q per 32-block with q in -127..127 (d = max|w| / 127, as Q8_0 has it), or None."""
    if w.ndim != 2 or w.shape[0] % GGUF_BLOCK:
        return None
    b = _blocks(w.astype(np.float32))
    scale = np.abs(b).max(1) / 127
    q = b / np.where(scale > 0, scale, 1)[:, None]
    if not (np.abs(q - np.round(q)) < _TOLERANCE).all():
        return None
    return Grid8(np.round(q).reshape(w.shape).astype(np.int16), scale)


@lru_cache(maxsize=8)  # export resolves "auto", then checks, then --precision auto asks again per candidate
def on_grid(model_path: Path) -> bool:
    """Whether the first decoder layer's projections of an HF folder are on a 4-bit GGUF grid (read lazily)."""
    from safetensors import safe_open

    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            names = [k for k in f.keys() if ".layers.0." in k and k.endswith("proj.weight")]
            if names:
                return all(grid4(f.get_tensor(k).T) is not None for k in names)  # HF [out, in]: blocks run along in
    return False
