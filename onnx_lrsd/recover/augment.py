"""On-the-fly augmentation of unlabeled inputs (the teacher labels whatever it is shown).

Images (float, rank 4, NCHW): per sample x' = clip(c·(x − μ) + μ + b + σ·ε) with contrast
c ~ U(0.7, 1.3), brightness b ~ U(−0.1, 0.1)·s, noise σ ~ U(0, 0.08)·s (s: the batch's
std), then with probability 0.3 a 3×3 box blur and with probability 0.25 a 2× down- and
up-scale; clipped to the data's range. Tokens (integer ids): each real position but the
first and last of a sequence becomes `unk_id` with probability 0.1. Noise: Gaussian noise
of 0.05 of the std.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np

Feeds = Dict[str, np.ndarray]
Augment = Callable[[Feeds, np.random.Generator], Feeds]

TOKEN_DROP = 0.1


def input_kind(feeds: Mapping[str, np.ndarray]) -> str:
    """"image" for a float rank-4 input with ≤ 4 channels, "tokens" for integer inputs,
    "noise" for other float inputs."""
    floats = [v for v in feeds.values() if np.issubdtype(v.dtype, np.floating)]
    if any(v.ndim == 4 and v.shape[1] <= 4 for v in floats):
        return "image"
    if not floats and any(np.issubdtype(v.dtype, np.integer) for v in feeds.values()):
        return "tokens"
    return "noise" if floats else "none"


def _box_blur(x: np.ndarray) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[2:]
    return sum(padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _rescale(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[2:]
    h2, w2 = h - h % 2, w - w % 2
    small = x[:, :, :h2, :w2].reshape(x.shape[0], x.shape[1], h2 // 2, 2, w2 // 2, 2).mean(axis=(3, 5))
    out = x.copy()
    out[:, :, :h2, :w2] = small.repeat(2, axis=2).repeat(2, axis=3)
    return out


def augment_images(x: np.ndarray, rng: np.random.Generator, bounds: Tuple[float, float]) -> np.ndarray:
    n = x.shape[0]
    scale = float(x.std()) or 1.0
    shape = (n, 1, 1, 1)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    out = rng.uniform(0.7, 1.3, shape) * (x - mean) + mean + rng.uniform(-0.1, 0.1, shape) * scale
    out = out + rng.uniform(0.0, 0.08, shape) * scale * rng.standard_normal(x.shape)
    blur = rng.random(n) < 0.3
    if blur.any():
        out[blur] = _box_blur(out[blur])
    rescale = rng.random(n) < 0.25
    if rescale.any():
        out[rescale] = _rescale(out[rescale])
    return np.clip(out, *bounds).astype(x.dtype)


def drop_tokens(ids: np.ndarray, mask: Optional[np.ndarray], rng: np.random.Generator, unk_id: int) -> np.ndarray:
    """Replace real positions (mask ≠ 0; first and last real position kept) by `unk_id`."""
    real = np.ones(ids.shape, bool) if mask is None else mask != 0
    inner = real.copy()
    inner[:, 0] = False
    last = real.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)
    inner[np.arange(len(ids)), last] = False
    out = ids.copy()
    out[inner & (rng.random(ids.shape) < TOKEN_DROP)] = unk_id
    return out


def make_augment(kind: str, sample: Mapping[str, np.ndarray], mask_input: Optional[str] = None,
                 unk_id: int = 100) -> Optional[Augment]:
    """The augmentation of `kind` for feeds like `sample` (None for "none")."""
    if kind == "none":
        return None
    if kind == "image":
        bounds = {k: (float(v.min()), float(v.max())) for k, v in sample.items() if np.issubdtype(v.dtype, np.floating)}

        def images(feeds: Feeds, rng: np.random.Generator) -> Feeds:
            return {k: augment_images(v, rng, bounds[k]) if k in bounds and v.ndim == 4 else v
                    for k, v in feeds.items()}
        return images
    if kind == "tokens":
        ints = [k for k, v in sample.items() if np.issubdtype(v.dtype, np.integer)]
        mask_name = mask_input or next((k for k in ints if "mask" in k.lower()), None)
        ids_name = max((k for k in ints if k != mask_name), key=lambda k: int(sample[k].max()), default=None)

        def tokens(feeds: Feeds, rng: np.random.Generator) -> Feeds:
            out = dict(feeds)
            if ids_name is not None:
                out[ids_name] = drop_tokens(feeds[ids_name], feeds.get(mask_name), rng, unk_id)
            return out
        return tokens
    stds = {k: float(v.std()) for k, v in sample.items() if np.issubdtype(v.dtype, np.floating)}

    def noise(feeds: Feeds, rng: np.random.Generator) -> Feeds:
        return {k: (v + 0.05 * stds[k] * rng.standard_normal(v.shape)).astype(v.dtype) if k in stds else v
                for k, v in feeds.items()}
    return noise
