#!/usr/bin/env python3
"""Generates tests/data/dequant_fixture.bin: random ggml blocks and gguf-py's dequantisation.

Provenance of the committed fixture: this script with gguf-py 0.19.0 (`pip install gguf numpy`),
seed 20240601. Only needed to regenerate the fixture; the Rust tests do not use Python.

Format, repeated per type (little-endian):
  u32 ggml type id | u32 n_elements | u32 n_bytes | n_bytes of blocks | n_elements x f32 expected
"""
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

rng = np.random.default_rng(20240601)

# byte offsets of the f16 scale fields in each block, which must be finite
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
N_BLOCKS = 4

out = bytearray()
for ty, fields in F16_FIELDS.items():
    block_elems, block_bytes = GGML_QUANT_SIZES[ty]
    raw = rng.integers(0, 256, size=(N_BLOCKS, block_bytes), dtype=np.uint8)
    for b in range(N_BLOCKS):
        for f in fields:
            raw[b, f:f + 2] = np.frombuffer(np.float16(rng.uniform(-0.1, 0.1)).tobytes(), dtype=np.uint8)
    expected = dequantize(raw.reshape(-1), ty).astype(np.float32)
    assert expected.size == N_BLOCKS * block_elems
    out += struct.pack("<III", int(ty), expected.size, raw.size)
    out += raw.tobytes()
    out += expected.tobytes()

for ty, dtype in ((T.F16, np.float16), (T.BF16, None)):
    n = 64
    if dtype is not None:
        raw = rng.uniform(-4, 4, size=n).astype(np.float16).view(np.uint8)
    else:
        raw = (rng.uniform(-4, 4, size=n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    expected = dequantize(raw, ty).astype(np.float32)
    out += struct.pack("<III", int(ty), expected.size, raw.size)
    out += raw.tobytes()
    out += expected.tobytes()

path = sys.argv[1] if len(sys.argv) > 1 else "tests/data/dequant_fixture.bin"
with open(path, "wb") as f:
    f.write(out)
print(f"wrote {len(out)} bytes to {path}")
