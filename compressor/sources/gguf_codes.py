"""Carry a GGUF file's integer codes into MatMulNBits weights exactly (no re-quantization).

GGUF stores a linear's weight as rows of n along k in blocks; MatMulNBits cuts each output row into blocks along k
too, so a block's codes, scale and zero point move over one for one. onnxruntime 1.32's CPU kernel reads
w = (q - zp) * scale (see compressor/lower/nbits.py) with zp a packed uint8, a float (4-bit only: the CPU kernel
refuses 8-bit weights with float zero points), or the default 2^(bits-1). Hence:

    Q4_0  w = d (q - 8)             4-bit, block 32, default zp 8
    Q4_1  w = d q + m               4-bit, block 32, float zp -m/d (d == 0 blocks: codes 1, zp 0, scale m)
    Q8_0  w = d q, q int8           8-bit, block 32, codes q + 128, default zp 128
    Q5_0  w = d (q - 16), q 5-bit   8-bit, block 32, codes q + 112, default zp 128
    Q4_K  w = d sc q - dmin m       4-bit, block 32 (eight per 256 super-block), float zp dmin m / (d sc)
    Q6_K  w = d sc (q - 32), q 6-bit 8-bit, block 16, codes q + 96, default zp 128
    Q5_1  w = d q + m, q 5-bit      8-bit, block 32, float zp -m/d
    Q5_K  w = d sc q - dmin m       8-bit, block 32, float zp dmin m / (d sc)

The CPU kernel refuses 8-bit weights with float zero points, and is 8-200x slower with 4-bit ones;
`nbits_graph.emit_matmul_nbits` lowers any float-zp weight as the symmetric MatMulNBits of the same codes plus a per-block
offset term, on the kernel's fast path. Q5_1 / Q5_K are therefore carried only on request (`split_zero_points=True`,
for a lowering that splits); every other type gives None: the caller re-quantizes those weights.

Exact means: codes and scales are the file's; `dequantize()` equals gguf-py's dequantization bit for bit where no zero point is divided out (Q4_0, Q8_0, Q5_0, Q6_K) and to float rounding
(~1 ulp of the block's range) where one is (Q4_1, Q4_K, Q5_1, Q5_K).

Llama-family attn_q / attn_k rows are permuted by llama.cpp's converter; transformers un-permutes them on load.
The same row permutation applied to codes, scales and zero points is exact (blocks run along k).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from compressor.lower.nbits import NBitsWeight, pack_codes


@dataclass
class GGUFTensor:
    name: str
    qtype: object  # gguf.GGMLQuantizationType
    n: int  # rows (output features): torch layout (n, k)
    k: int
    data: np.ndarray  # the file's raw bytes (uint8, one row of blocks per output row; memory-mapped)
    heads: int | None = None  # llama.cpp permuted these rows with this many heads (llama attn_q / attn_k)

    @property
    def type_name(self) -> str:
        return self.qtype.name

    def dequantize(self, unpermute: bool = True) -> np.ndarray:
        from gguf.quants import dequantize

        w = np.asarray(dequantize(self.data, self.qtype), dtype=np.float32).reshape(self.n, self.k)
        return w[self.unpermute_rows()] if unpermute and self.heads else w

    def unpermute_rows(self) -> np.ndarray:
        """Row order that undoes llama.cpp's q/k permutation (transformers' reverse_permute)."""
        dim = self.n // self.heads // 2
        return np.arange(self.n).reshape(self.heads, dim, 2).swapaxes(1, 2).reshape(-1)


_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


class _Header:
    """A GGUF file's metadata and tensor table, read directly: gguf.GGUFReader builds a numpy view per vocabulary
    entry and spends ~45 s on Gemma 3's 262k-token vocabulary; this skips arrays it does not need (~0.3 s)."""

    def __init__(self, path):
        import struct

        self.buf = np.memmap(str(path), dtype=np.uint8, mode="r")
        mm, self.pos = self.buf, 0
        self._u32, self._u64 = struct.Struct("<I"), struct.Struct("<Q")
        if bytes(mm[:4]) != b"GGUF":
            from compressor.errors import UsageError

            raise UsageError(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf checkpoint")
        self.pos = 4
        self.version = self.u32()
        n_tensors, n_kv = self.u64(), self.u64()
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self.string()
            self.fields[key] = self.value(self.u32())
        self.tensors = []
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.u64() for _ in range(self.u32())]
            self.tensors.append((name, dims, self.u32(), self.u64()))
        align = int(self.fields.get("general.alignment", 32))
        self.data_start = -(-self.pos // align) * align

    def data_end(self) -> int:
        """Where the last tensor's bytes end (data start + the largest offset + byte size): a whole file is at least
        this long. Raises ValueError for a tensor type this gguf package does not know."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        end = 0
        for _, dims, qtype, offset in self.tensors:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            count = 1
            for d in dims:
                count *= int(d)
            end = max(end, offset + count // block * type_size)
        return self.data_start + end

    def u32(self) -> int:
        v = self._u32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self) -> int:
        v = self._u64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", "replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            dt = np.dtype(_SCALARS[vtype])
            v = np.frombuffer(self.buf, dt, 1, self.pos)[0].item()
            self.pos += dt.itemsize
            return v
        if vtype == 8:
            return self.string()
        if vtype == 9:  # array: skipped (None), the metadata needed here is scalar
            etype, count = self.u32(), self.u64()
            if etype in _SCALARS:
                self.pos += np.dtype(_SCALARS[etype]).itemsize * count
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_linears(path) -> dict[str, GGUFTensor]:
    """Every 2-D tensor of a GGUF file (the linears and the token embedding), raw, by GGUF name (memory-mapped)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    header = _Header(path)
    arch = header.fields.get("general.architecture")
    n_head = header.fields.get(f"{arch}.attention.head_count")
    n_kv = header.fields.get(f"{arch}.attention.head_count_kv") or n_head
    out = {}
    for name, dims, qtype, offset in header.tensors:
        if len(dims) != 2:
            continue
        qtype = GGMLQuantizationType(qtype)
        k, n = (int(d) for d in dims)  # GGUF lists ne[0] (the contiguous k) first
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = k // block * type_size
        start = header.data_start + offset
        data = header.buf[start:start + n * row_bytes].reshape(n, row_bytes)
        heads = None
        if arch == "llama" and n_head:  # transformers' LlamaTensorProcessor
            heads = n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None
        out[name] = GGUFTensor(name, qtype, n, k, data, heads)
    return out


def _blocks(t: GGUFTensor, type_size: int) -> np.ndarray:
    return np.ascontiguousarray(t.data).view(np.uint8).reshape(-1, type_size)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """GGML's 32-element nibble layout: byte i holds element i (low nibble) and element i + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _affine(codes: np.ndarray, scale: np.ndarray, minus: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w = scale * q - minus per block -> (codes, scale, float zp = minus / scale); a zero-scale block (w = -minus
    throughout) becomes codes 1, zp 0, scale -minus, which is exact too."""
    codes = codes.copy()
    dead = scale == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(dead, 0.0, minus / np.where(dead, 1.0, scale)).astype(np.float32)
    codes[dead] = 1
    scale = np.where(dead, -minus, scale).astype(np.float32)
    return codes, scale, zp


def _weight(t, bits, block, codes, scale, zp, origin) -> NBitsWeight:
    codes = codes.reshape(t.n, t.k)
    w = NBitsWeight(bits, block, t.n, t.k, pack_codes(codes, bits, block), scale.astype(np.float32).reshape(-1),
                    None if zp is None else zp.astype(np.float32).reshape(-1), origin)
    return w.take_rows(t.unpermute_rows()) if t.heads else w


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-block header: each 32-element sub-block's scale d * sc and minimum dmin * m (float32
    products, as gguf-py computes them)."""
    from gguf.quants import Q4_K

    d, dmin = _f16(b[:, :2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, m = Q4_K.get_scale_min(b[:, 4:16].copy())
    return (d * sc.astype(np.float32)).reshape(-1), (dmin * m.astype(np.float32)).reshape(-1)


def to_nbits(t: GGUFTensor, split_zero_points: bool = False) -> NBitsWeight | None:
    """The exact MatMulNBits carrier of a GGUF tensor (un-permuted like transformers), or None for other types.

    Q5_1 / Q5_K give 8-bit weights with float zero points, which the CPU kernel refuses as MatMulNBits inputs: they
    are carried only for a lowering that splits float zero points off (`split_zero_points=True`, as
    compressor.lower.nbits_graph.emit_matmul_nbits does by default)."""
    from gguf.constants import GGMLQuantizationType as Q

    qt = t.qtype
    if not exact_type(t, split_zero_points):
        return None
    if qt == Q.Q4_0:
        b = _blocks(t, 18)
        return _weight(t, 4, 32, _nibbles32(b[:, 2:]), _f16(b[:, :2]), None, "gguf Q4_0 (exact)")
    if qt == Q.Q4_1:
        b = _blocks(t, 20)
        d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
        codes, scale, zp = _affine(_nibbles32(b[:, 4:]), d, -m)
        return _weight(t, 4, 32, codes, scale, zp, "gguf Q4_1 (exact)")
    if qt == Q.Q8_0:
        b = _blocks(t, 34)
        codes = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return _weight(t, 8, 32, codes, _f16(b[:, :2]), None, "gguf Q8_0 (exact)")
    if qt == Q.Q5_0:
        b = _blocks(t, 22)
        qh = np.ascontiguousarray(b[:, 2:6]).view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
        q = _nibbles32(b[:, 6:]) | (((qh & 1).astype(np.uint8)) << 4)
        return _weight(t, 8, 32, q + 112, _f16(b[:, :2]), None, "gguf Q5_0 (exact)")
    if qt == Q.Q5_1:
        b = _blocks(t, 24)
        qh = np.ascontiguousarray(b[:, 4:8]).view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
        q = _nibbles32(b[:, 8:]) | (((qh & 1).astype(np.uint8)) << 4)
        codes, scale, zp = _affine(q, _f16(b[:, :2]), -_f16(b[:, 2:4]))
        return _weight(t, 8, 32, codes, scale, zp, "gguf Q5_1 (exact; float zero points, lowered split)")
    if qt == Q.Q5_K:
        b = _blocks(t, 176)
        nb = len(b)
        scale, minus = _k_scales(b)
        ql = (b[:, 48:].reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        qh = (b[:, 16:48].reshape(nb, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 0x01
        q = (ql.reshape(nb, 8, 32) | (qh.reshape(nb, 8, 32) << 4)).reshape(nb * 8, 32)
        codes, scale, zp = _affine(q, scale, minus)
        return _weight(t, 8, 32, codes, scale, zp, "gguf Q5_K (exact; float zero points, lowered split)")
    if qt == Q.Q4_K:
        b = _blocks(t, 144)
        nb = len(b)
        scale, minus = _k_scales(b)
        qs = b[:, 16:].reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 0x0F).reshape(nb * 8, 32)
        codes, scale, zp = _affine(codes, scale, minus)
        return _weight(t, 4, 32, codes, scale, zp, "gguf Q4_K (exact)")
    if qt == Q.Q6_K:
        b = _blocks(t, 210)
        nb = len(b)
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        ql = (ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        qh = (qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = ql.reshape(nb, 8, 32) | (qh.reshape(nb, 8, 32) << 4)  # 0..63, element order
        scale = (d[:, None] * np.ascontiguousarray(sc).view(np.int8).astype(np.float32)).reshape(-1)
        return _weight(t, 8, 16, q.reshape(nb * 16, 16) + 96, scale, None, "gguf Q6_K (exact)")
    return None


def _key(w: np.ndarray) -> tuple:
    """Shape and a hash of a strided sample of the float32 bytes (a match is then confirmed with array_equal)."""
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    sample = np.concatenate([flat[:4096], flat[4096::61], flat[-4096:]])
    return (w.shape, hashlib.blake2b(sample.tobytes(), digest_size=16).hexdigest())


def match_linears(path, named_weights: dict, split_zero_points: bool = False) -> dict[str, NBitsWeight]:
    """The exact carrier of every given weight (n, k) that equals a GGUF tensor's dequantized (un-permuted) values.

    Matching is by content (shape, hash of the float32 bytes, then an exact comparison), so renamed, removed or
    renumbered blocks and a tied LM head (equal to token_embd) are found; a weight a pass changed, or one stored in a
    type without an exact carrier, is left out for the caller to re-quantize.
    """
    by_key: dict[tuple, list[str]] = {}
    weights = {}
    for name, w in named_weights.items():
        w = w.detach().cpu().float().numpy() if hasattr(w, "detach") else np.asarray(w, dtype=np.float32)
        if w.ndim == 2:
            weights[name] = w
            by_key.setdefault(_key(w), []).append(name)
    wanted = {w.shape for w in weights.values()}
    out: dict[str, NBitsWeight] = {}
    for t in read_gguf_linears(path).values():
        if (t.n, t.k) not in wanted or not exact_type(t, split_zero_points):
            continue
        w = t.dequantize()
        names = [name for name in by_key.get(_key(w), []) if name not in out and np.array_equal(weights[name], w)]
        if names:
            carrier = to_nbits(t, split_zero_points)
            out.update((name, carrier) for name in names)
    return out


def exact_type(t: GGUFTensor, split_zero_points: bool = False) -> bool:
    """Whether `to_nbits` carries this tensor (its type has an exact MatMulNBits form on the CPU kernel)."""
    from gguf.constants import GGMLQuantizationType as Q

    if t.qtype in (Q.Q5_1, Q.Q5_K):
        return split_zero_points and (t.qtype == Q.Q5_1 or t.k % 256 == 0)
    return t.qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0) or (t.qtype in (Q.Q4_K, Q.Q6_K) and t.k % 256 == 0)
