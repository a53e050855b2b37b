"""Every stored encoding round-trips within the bound alignkd/cache/encodings.py states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkd.cache.encodings import LOG_RANGE, LOG_RANGE_4, decode, encode, to_torch_stored, widen
from alignkd.errors import ConfigError


def _attention(rng, T=40, H=4, Nv=144) -> np.ndarray:
    """Softmax rows over Nv vision + 200 other keys, with some hard zeros and an all-zero row."""
    z = rng.normal(0, 2.5, (T, H, Nv + 200))
    p = (np.exp(z) / np.exp(z).sum(-1, keepdims=True))[..., :Nv].astype(np.float32)
    p[0, 0, :5] = 0.0
    p[1, 1] = 0.0
    return p


def _round_trip(x: np.ndarray, enc: str) -> np.ndarray:
    stored, scale = encode(x, enc)
    return decode(stored, enc, scale, x.shape)


@pytest.mark.parametrize("enc,rel", [("bfloat16", 2.0 ** -8), ("float16", 2.0 ** -11)])
def test_float_encodings_relative_bound(enc, rel):
    x = np.random.default_rng(0).normal(0, 3, (64, 96)).astype(np.float32)
    err = np.abs(_round_trip(x, enc) - x)
    assert (err <= rel * np.abs(x) + 1e-30).all()
    assert err.max() > 0  # lossy for real


def test_uint8_sqrt_bound():
    p = _attention(np.random.default_rng(1))
    err = np.abs(_round_trip(p, "uint8-sqrt") - p)
    assert (err <= (2 * np.sqrt(p) + 1 / 255) / 510 + 1e-9).all()


def test_uint8_log_bound():
    p = _attention(np.random.default_rng(2))
    got = _round_trip(p, "uint8-log")
    m = p.max(-1, keepdims=True)
    above = p >= m * np.exp(-LOG_RANGE)
    rel = (np.exp(LOG_RANGE / 254) - 1) / 2
    assert (np.abs(got - p)[above] <= rel * p[above] * (1 + 1e-5)).all()
    assert (np.abs(got - p)[~above] <= np.broadcast_to(m * np.exp(-LOG_RANGE) / 2, p.shape)[~above] * 1.0001).all()
    assert abs((got - p)[above].mean()) < 1e-3 * p[above].mean()  # nearest in linear terms: no bias
    np.testing.assert_array_equal(got[1, 1], 0.0)          # an all-zero row stays zero
    np.testing.assert_array_equal(got.max(-1), p.max(-1))  # the row max is exact
    # what it is for: at p ~ 1e-3 it keeps ~2 % where sqrt companding keeps ~13 %
    small = (p > 5e-4) & (p < 2e-3)
    sqrt_err = np.abs(_round_trip(p, "uint8-sqrt") - p)[small] / p[small]
    log_err = np.abs(got - p)[small] / p[small]
    assert log_err.max() < 0.025 and sqrt_err.max() > 0.1


def test_int8_channel_bound():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((144, 256)) * np.exp(rng.normal(-1, 0.5, 256))).astype(np.float32)
    x[:, 7] *= 20
    x[:, 9] = 0.0  # a dead channel
    stored, scale = encode(x, "int8-channel")
    assert stored.dtype == np.int8 and scale.shape == (256,)
    got = decode(stored, "int8-channel", scale, x.shape)
    assert (np.abs(got - x) <= scale / 2 * (1 + 1e-6)).all()
    np.testing.assert_array_equal(got[:, 9], 0.0)


def test_uint4_log_bound():
    p = _attention(np.random.default_rng(5))
    stored, m = encode(p, "uint4-log")
    assert stored.size == p.size // 2
    got = decode(stored, "uint4-log", m, p.shape)
    m = m.reshape(p.shape[:-1] + (1,))
    above = p >= m * np.exp(-LOG_RANGE_4)
    rel = (np.exp(LOG_RANGE_4 / 14) - 1) / 2
    assert (np.abs(got - p)[above] <= rel * p[above] * (1 + 1e-5)).all()
    assert (np.abs(got - p)[~above] <= np.broadcast_to(m * np.exp(-LOG_RANGE_4) / 2, p.shape)[~above] * 1.0001).all()


def test_int4_channel_bound():
    x = np.random.default_rng(6).normal(0, 1, (144, 64)).astype(np.float32) * np.linspace(0.1, 5, 64)
    stored, scale = encode(x, "int4-channel")
    assert stored.size == x.size // 2
    got = decode(stored, "int4-channel", scale, x.shape)
    assert (np.abs(got - x) <= scale / 2 * (1 + 1e-6)).all()
    np.testing.assert_allclose(np.abs(got).max(0), np.abs(x).max(0), rtol=1e-6)  # the channel max is a level


def test_4bit_needs_an_even_last_axis():
    with pytest.raises(ConfigError, match="even number"):
        encode(np.ones((3, 5), np.float32), "int4-channel")


def test_log_float16_tail_keeps_tiny_tails():
    r = np.array([0.0, 1e-12, 3e-9, 1e-4, 0.2, 1.0], np.float32)
    got = _round_trip(r, "log-float16")
    assert got[0] == 0.0 and got[-1] == 1.0
    np.testing.assert_allclose(got[1:], r[1:], rtol=np.abs(np.log(r[1:])).max() * 2 ** -10)
    assert r[1].astype(np.float16) == 0  # what plain fp16 would have stored


@pytest.mark.parametrize("enc", ["uint16", "uint32", "int32"])
def test_ids_lossless(enc):
    ids = np.array([0, 1, 31999, 65535 if enc != "int32" else 2**31 - 1])
    np.testing.assert_array_equal(_round_trip(ids, enc), ids)


def test_ids_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit uint16"):
        encode(np.array([70000]), "uint16")


@pytest.mark.parametrize("enc", ["bfloat16", "float16", "uint8-sqrt", "uint8-log", "int8-channel",
                                 "uint4-log", "int4-channel"])
def test_torch_widen_equals_numpy_decode(enc):
    x = _attention(np.random.default_rng(4)) if "uint" in enc else \
        np.random.default_rng(4).normal(0, 1, (144, 64)).astype(np.float32)
    stored, scale = encode(x, enc)
    packed = enc in ("uint4-log", "int4-channel")
    t = to_torch_stored(stored.reshape(*x.shape[:-1], x.shape[-1] // 2 if packed else x.shape[-1]), enc)
    s = None if scale is None else torch.from_numpy(scale.reshape(x.shape[:-1] if "log" in enc else (-1,)))
    np.testing.assert_array_equal(widen(t, enc, s).numpy(), decode(stored, enc, scale, x.shape))


def test_every_encoding_of_the_format_has_its_arithmetic_and_agrees_on_packing():
    """One table says what the format holds (storage_schemas.ENCODINGS), one says how to
    compute it (cache.encodings.CODECS): a new encoding added to one but not the other fails here."""
    from alignkd.cache.encodings import CODECS
    from alignkd.storage_schemas import ENCODINGS

    assert set(CODECS) == set(ENCODINGS)
    for name, spec in ENCODINGS.items():
        assert getattr(CODECS[name], "packed", False) == spec.packed, name
