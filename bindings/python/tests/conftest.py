"""Shared fixtures: fresh random data (seed printed, shown on failure) and
NaN-poisoned outputs, as the C++ suites do."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

# Run from a checkout without `pip install`: import the package beside tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libmoe import reference as ref  # noqa: E402

BF16_NAN = np.uint16(0x7FC0)


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print("libmoe test seed:", seed)
    return np.random.default_rng(seed)


def poisoned(shape, dtype):
    """An output array every element of which fails a check unless written."""
    dtype = np.dtype(dtype)
    if dtype == np.uint16:  # bf16 bits
        return np.full(shape, BF16_NAN, dtype=np.uint16)
    if dtype.kind == "f":
        return np.full(shape, np.nan, dtype=dtype)
    return np.full(shape, -7777, dtype=dtype)


def to_dtype(x, dtype):
    """(array handed to libmoe, its exact value as float64, dtype= keyword)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "f32":
        return x, x.astype(np.float64), None
    if dtype == "f16":
        h = x.astype(np.float16)
        return h, h.astype(np.float64), None
    if dtype == "bf16":
        b = ref.f32_to_bf16(x)
        return b, ref.bf16_to_f32(b).astype(np.float64), "bf16"
    raise ValueError(dtype)


def from_dtype(y, dtype):
    y = np.asarray(y)
    return ref.bf16_to_f32(y).astype(np.float64) if dtype == "bf16" else y.astype(np.float64)


TOL = {"f32": 1e-5, "f16": 1e-2, "bf16": 1e-2}
