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
from alignkd.storage_schemas import ABSENT, ATTN_RECOMPUTED, ENCODED_DTYPE

LOG_RANGE = 12.0  # uint8-log covers log(p / row max) in [-12, 0]: 6e-6 of the row's max
LOG_RANGE_4 = 7.0  # uint4-log: [-7, 0] in 14 steps of 0.5, i.e. down to 1e-3 of the row's max
_LITTLE = sys.byteorder == "little"
_SQRT_LUT = (np.arange(256, dtype=np.float32) / 255.0) ** 2
_LOG_LUT = np.concatenate([[0.0], np.exp(-LOG_RANGE * (255 - np.arange(1, 256)) / 254)]).astype(np.float32)
_LOG4_LUT = np.concatenate([[0.0], np.exp(-LOG_RANGE_4 * (15 - np.arange(1, 16)) / 14)]).astype(np.float32)
_INT4_LUT = np.arange(-8, 8, dtype=np.float32)  # nibble n holds q = n - 8, q in [-7, 7]


class Encoding:
    """One stored form of a float tensor: `encode` (numpy, the writer), `decode` (numpy, the
    reader) and `widen` (torch, on the training device). The format's facts about it (stored
    dtype, scales, packing, compression) are its row of `storage_schemas.ENCODINGS`."""

    name = ""

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A contiguous tensor -> (flat stored values, flat float32 scales or None)."""
        return x.reshape(-1).astype(ENCODED_DTYPE[self.name], copy=False), None

    def decode(self, stored: np.ndarray, scale: np.ndarray | None, shape: tuple[int, ...] | None) -> np.ndarray:
        """Flat stored values (+ scales) -> flat float32."""
        return stored.astype(np.float32, copy=False)

    def widen(self, t, scale):
        """A stored-width torch tensor (+ scales) -> float32 on its device."""
        return t.float()


class Plain(Encoding):
    """float16 / float32 and the layer0 placeholder: numpy's own cast."""

    def __init__(self, name: str) -> None:
        self.name = name


class Ids(Plain):
    """uint16 / uint32 / int32 ids and counts: lossless, read back as int64."""

    def encode(self, x):
        flat = x.reshape(-1)
        if self.name != "int32" and flat.size and (flat.min() < 0 or flat.max() > np.iinfo(self.name).max):
            raise ValueError(f"ids {flat.min()}..{flat.max()} do not fit {self.name}")
        return flat.astype(ENCODED_DTYPE[self.name], copy=False), None

    def decode(self, stored, scale, shape):
        return stored.astype(np.int64)


class BFloat16(Encoding):
    name = "bfloat16"

    def encode(self, x):
        u = x.reshape(-1).astype(np.float32, copy=False).view(np.uint32)
        # round to nearest even on the 16 dropped bits (what torch's .bfloat16() does)
        u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
        return (u >> np.uint32(16)).astype(np.uint16), None

    def decode(self, stored, scale, shape):
        return _bf16_to_f32(stored)


class SqrtUint8(Encoding):
    """sqrt companding: probabilities ~1/L keep ~4 bits; linear u8 would zero them."""

    name = "uint8-sqrt"

    def encode(self, x):
        return np.rint(np.sqrt(np.clip(x.reshape(-1), 0.0, 1.0, dtype=np.float32)) * 255.0).astype(np.uint8), None

    def decode(self, stored, scale, shape):
        return _SQRT_LUT[stored]

    def widen(self, t, scale):
        import torch

        return torch.from_numpy(_SQRT_LUT).to(t.device)[t.long()]


class LogRows(Encoding):
    """uint8-log / uint4-log attention: per-row max scale, geometric levels (module docstring)."""

    def __init__(self, name: str, lut: np.ndarray, packed: bool) -> None:
        self.name, self.lut, self.packed = name, lut, packed

    def encode(self, x):
        q, m = _encode_log(x.astype(np.float32, copy=False), self.lut)
        return (_pack(q, x.shape) if self.packed else q), m

    def decode(self, stored, scale, shape):
        q = _unpack(stored) if self.packed else stored
        last = shape[-1] if shape else q.size
        return (self.lut[q].reshape(-1 if last else 0, last) * scale[:, None]).reshape(-1)

    def widen(self, t, scale):
        import torch

        t = _unpack_torch(t) if self.packed else t
        return torch.from_numpy(self.lut).to(t.device)[t.long()] * scale.float().unsqueeze(-1)


class IntChannels(Encoding):
    """int8-channel / int4-channel vision: per-channel max |x| scale over the sample's tokens."""

    def __init__(self, name: str, top: int) -> None:
        self.name, self.top, self.packed = name, top, top < 127

    def encode(self, x):
        q, s = _encode_int(x.astype(np.float32, copy=False), self.top)
        return (_pack((q + 8).astype(np.uint8), x.shape) if self.packed else q), s

    def decode(self, stored, scale, shape):
        q = _INT4_LUT[_unpack(stored)] if self.packed else stored.astype(np.float32)
        last = shape[-1] if shape else q.size
        return (q.reshape(-1 if last else 0, last) * scale[None, :]).reshape(-1)

    def widen(self, t, scale):
        q = _unpack_torch(t).float() - 8.0 if self.packed else t.float()
        return q * scale.float().unsqueeze(-2)


class LogFloat16(Encoding):
    """The logit tail mass r as fp16 log r (r = 0 -> -inf): a 1e-9 tail survives."""

    name = "log-float16"

    def encode(self, x):
        with np.errstate(divide="ignore"):
            return np.log(np.clip(x.reshape(-1).astype(np.float64), 0.0, 1.0)).astype(np.float16), None

    def decode(self, stored, scale, shape):
        return np.exp(stored.astype(np.float32))


# name -> encoding: one entry per row of storage_schemas.ENCODINGS (tests/test_encodings.py checks both agree)
CODECS: dict[str, Encoding] = {e.name: e for e in (
    BFloat16(), Plain("float16"), SqrtUint8(), LogRows("uint8-log", _LOG_LUT, packed=False),
    LogRows("uint4-log", _LOG4_LUT, packed=True), IntChannels("int8-channel", 127), IntChannels("int4-channel", 7),
    LogFloat16(), Plain("float32"), Ids("int32"), Ids("uint16"), Ids("uint32"), Plain(ATTN_RECOMPUTED), Plain(ABSENT),
)}


def encode(values: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A tensor -> (flat stored values, flat float32 scales or None)."""
    return CODECS[encoding].encode(np.ascontiguousarray(values))


def decode(stored: np.ndarray, encoding: str, scale: np.ndarray | None = None,
           shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Flat stored values (+ scales) -> float32 (integer ids -> int64), reshaped to `shape` if given."""
    out = CODECS[encoding].decode(stored, scale, shape)
    return out.reshape(shape) if shape is not None else out


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


def _unpack_torch(t):
    """[..., n/2] bytes -> [..., n] nibbles, low nibble first."""
    import torch

    return torch.stack([t & 15, t >> 4], dim=-1).flatten(-2)


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
    return CODECS[encoding].widen(t, scale)
