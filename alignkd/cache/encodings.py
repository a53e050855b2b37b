"""Tensor encodings of the cache: float -> stored dtype (+ scales) and back, in numpy and torch.

Every encoding is per array and per sample, so a sample decodes from its own bytes and
scales alone. The stated bounds below are what tests/test_encodings.py checks:

- `bfloat16` / `float16`: round to nearest even; relative error <= 2^-8 / 2^-11 (normal range).
- `uint8-sqrt` (attention): q = round(255 sqrt(p)), p' = (q/255)^2;
  |p - p'| <= (2 sqrt(p) + 1/255) / 510.
- `uint8-log` (attention): per row (last axis) a float32 scale m = max p; levels
  p' = m exp(-R (255 - q) / 254) for q >= 1 (R = LOG_RANGE) and 0 for q = 0, and p is
  stored as the level nearest in linear terms (no bias from rounding in log space; a
  value within float32 rounding of a midpoint may take either neighbour).
  Relative error <= (exp(R / 254) - 1) / 2 (2.4 %) above m e^-R, absolute error
  <= m e^-R / 2 below it. Small
  probabilities keep the same relative precision as large ones, which sqrt companding
  does not (13 % at p = 1e-3).
- `int8-channel` (vision): per channel (last axis) a float32 scale s = max |x| / 127
  over the sample's tokens; q = round(x / s), x' = q s; |x - x'| <= s / 2.
- `uint4-log` (attention): as uint8-log with 15 levels over R4 = LOG_RANGE_4 and two values
  per byte. Relative error <= (exp(R4 / 14) - 1) / 2 (32 %) above m e^-R4, absolute error
  <= m e^-R4 / 2 below it.
- `int4-channel` (vision): as int8-channel with q in [-7, 7] (s = max |x| / 7), two values
  per byte; |x - x'| <= s / 2.
- `log-float16` (logit tail): the tail mass r stored as fp16 log r (r = 0 -> -inf); the
  tail is a logsumexp at capture, so a 1e-9 tail survives where fp16 r would flush to 0.
- `uint16` / `uint32` / `int32` / `float32`: lossless.

`widen` is the torch side: the distill DataLoader ships stored widths (bf16 bits, fp16,
uint8 plus scales) and the objective widens on its device.
"""

from __future__ import annotations

import sys

import numpy as np

from alignkd.errors import ConfigError
from alignkd.storage_schemas import ENCODED_DTYPE, PACKED_ENCODINGS

LOG_RANGE = 12.0  # uint8-log covers log(p / row max) in [-12, 0]: 6e-6 of the row's max
LOG_RANGE_4 = 7.0  # uint4-log: [-7, 0] in 14 steps of 0.5, i.e. down to 1e-3 of the row's max
_LITTLE = sys.byteorder == "little"
_SQRT_LUT = (np.arange(256, dtype=np.float32) / 255.0) ** 2
_LOG_LUT = np.concatenate([[0.0], np.exp(-LOG_RANGE * (255 - np.arange(1, 256)) / 254)]).astype(np.float32)
_LOG4_LUT = np.concatenate([[0.0], np.exp(-LOG_RANGE_4 * (15 - np.arange(1, 16)) / 14)]).astype(np.float32)
_INT4_LUT = np.arange(-8, 8, dtype=np.float32)  # nibble n holds q = n - 8, q in [-7, 7]


def encode(values: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A tensor -> (flat stored values, flat float32 scales or None)."""
    x = np.ascontiguousarray(values)
    if encoding in ("uint8-log", "uint4-log"):
        lut = _LOG_LUT if encoding == "uint8-log" else _LOG4_LUT
        q, m = _encode_log(x.astype(np.float32, copy=False), lut)
        return (_pack(q, x.shape) if encoding == "uint4-log" else q), m
    if encoding in ("int8-channel", "int4-channel"):
        q, s = _encode_int(x.astype(np.float32, copy=False), 127 if encoding == "int8-channel" else 7)
        return (_pack((q + 8).astype(np.uint8), x.shape) if encoding == "int4-channel" else q), s
    x = x.reshape(-1)
    if encoding == "bfloat16":
        u = x.astype(np.float32, copy=False).view(np.uint32)
        # round to nearest even on the 16 dropped bits (what torch's .bfloat16() does)
        u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
        return (u >> np.uint32(16)).astype(np.uint16), None
    if encoding == "uint8-sqrt":
        # sqrt companding: probabilities ~1/L keep ~4 bits; linear u8 would zero them
        return np.rint(np.sqrt(np.clip(x, 0.0, 1.0, dtype=np.float32)) * 255.0).astype(np.uint8), None
    if encoding == "log-float16":
        with np.errstate(divide="ignore"):
            return np.log(np.clip(x.astype(np.float64), 0.0, 1.0)).astype(np.float16), None
    if encoding in ("uint16", "uint32") and x.size and (x.min() < 0 or x.max() > np.iinfo(encoding).max):
        raise ValueError(f"ids {x.min()}..{x.max()} do not fit {encoding}")
    return x.astype(ENCODED_DTYPE[encoding], copy=False), None


def _encode_log(p: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The level nearest in linear terms, computed in log space without a table lookup.

    The levels are geometric (ratio g), so the linear midpoint between two neighbours sits
    the same fraction c of a level above the lower one; flooring log(r)/log(g) + 1 - c gives
    the nearer level directly. Rounding in log space instead would bias every value up (exp
    is convex), and the MSE loss sums those biases over a row. This is ~6 array passes plus
    one log; a midpoint gather per value made it 1.6x slower (bench/cache_storage.py writer).
    """
    levels = len(lut) - 1
    log_g = float(np.log(lut[-1] / lut[-2]))
    c = np.log((1 + np.exp(log_g)) / 2) / log_g
    m = p.max(axis=-1, keepdims=True, initial=0.0)           # initial: a row may have no columns (no image)
    safe = np.where(m > 0, m, np.float32(1.0))               # an all-zero row stays 0
    x = np.log(np.maximum(p, np.float32(1e-30)))             # in place from here on
    x *= np.float32(1 / log_g)
    x += (np.float32(levels + 1 - c) - np.log(safe) / np.float32(log_g)).astype(np.float32)
    q = x.astype(np.int16)                                   # truncation = floor where it matters (x >= 1)
    np.clip(q, 1, levels, out=q)
    q *= p > safe * np.float32(lut[1] / 2)                   # below half the lowest level: 0
    return q.astype(np.uint8).reshape(-1), m.astype(np.float32).reshape(-1)


def _encode_int(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0, initial=0.0) / top  # initial: a sample may have no tokens
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint(x / safe), -top, top).astype(np.int8)
    return q.reshape(-1), s.astype(np.float32)


def _pack(q: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if shape and shape[-1] % 2:
        raise ConfigError(f"the 4-bit encodings pack two values per byte and need an even number of vision "
                          f"tokens and channels, not shape {tuple(shape)}; choose an 8-bit encoding.")
    return (q[0::2] | (q[1::2] << 4)).astype(np.uint8)


def _unpack(stored: np.ndarray) -> np.ndarray:
    out = np.empty(2 * stored.size, np.uint8)
    out[0::2], out[1::2] = stored & 15, stored >> 4
    return out


def decode(stored: np.ndarray, encoding: str, scale: np.ndarray | None = None,
           shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Flat stored values (+ scales) -> float32 (integer ids -> int64), reshaped to `shape` if given."""
    if encoding == "bfloat16":
        out = _bf16_to_f32(stored)
    elif encoding == "uint8-sqrt":
        out = _SQRT_LUT[stored]
    elif encoding in ("uint8-log", "uint4-log"):
        q, lut = (stored, _LOG_LUT) if encoding == "uint8-log" else (_unpack(stored), _LOG4_LUT)
        last = shape[-1] if shape else q.size
        out = (lut[q].reshape(-1 if last else 0, last) * scale[:, None]).reshape(-1)
    elif encoding in ("int8-channel", "int4-channel"):
        q = stored.astype(np.float32) if encoding == "int8-channel" else _INT4_LUT[_unpack(stored)]
        last = shape[-1] if shape else q.size
        out = (q.reshape(-1 if last else 0, last) * scale[None, :]).reshape(-1)
    elif encoding == "log-float16":
        out = np.exp(stored.astype(np.float32))
    elif encoding in ("int32", "uint16", "uint32"):
        out = stored.astype(np.int64)
    else:
        out = stored.astype(np.float32, copy=False)
    return out.reshape(shape) if shape is not None else out


def _bf16_to_f32(stored: np.ndarray) -> np.ndarray:
    if not _LITTLE:
        return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    out = np.zeros(2 * stored.size, np.uint16)
    out[1::2] = stored  # high half of each little-endian float32
    return out.view(np.float32)


# ------------------------------------------------------------------ torch: stored width out, widen on device
def to_torch_stored(stored: np.ndarray, encoding: str):
    """Stored numpy values -> a torch tensor of the same width (bf16 bits become torch.bfloat16)."""
    import torch

    if encoding == "bfloat16":
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(stored)


def widen(t, encoding: str, scale=None):
    """A stored-width torch tensor (+ its scale, broadcast on the leading axes) -> float32, on t's device.

    uint8-log: `scale` has t's shape without the last axis; int8-channel: `scale` is
    [..., D] with t of shape [..., N, D] (one scale row per sample).
    """
    import torch

    if encoding == "uint8-sqrt":
        return torch.from_numpy(_SQRT_LUT).to(t.device)[t.long()]
    if encoding in PACKED_ENCODINGS:  # [..., n/2] bytes -> [..., n] nibbles, low nibble first
        t = torch.stack([t & 15, t >> 4], dim=-1).flatten(-2)
    if encoding in ("uint8-log", "uint4-log"):
        lut = _LOG_LUT if encoding == "uint8-log" else _LOG4_LUT
        return torch.from_numpy(lut).to(t.device)[t.long()] * scale.float().unsqueeze(-1)
    if encoding == "int8-channel":
        return t.float() * scale.float().unsqueeze(-2)
    if encoding == "int4-channel":
        return (t.float() - 8.0) * scale.float().unsqueeze(-2)
    return t.float()
