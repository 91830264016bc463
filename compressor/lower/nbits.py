"""Block-quantized linear weights for onnxruntime's `com.microsoft.MatMulNBits` (4 or 8 bits).

A linear y = x @ W.T with W of shape (n, k) (torch layout) becomes MatMulNBits(x, B, scales[, zero_points]) with
K = k, N = n: row j of W (output j) is cut into k_blocks = ceil(k / block_size) blocks along k, each block holds
block_size codes packed into bytes (bits=4: two per byte, the element with the lower index in the low nibble) and
one scale. The kernel dequantizes code q of block (j, b) as

    w = (q - zp[j, b]) * scale[j, b]

where zp is, when the zero_points input is absent, 2^(bits-1) (8 for 4-bit, 128 for 8-bit); when uint8, the codes'
own type packed like B (4-bit: two blocks per byte, low nibble first, each row padded to ceil(k_blocks / 2) bytes);
when float (same type as scales), used as is, without rounding (checked against onnxruntime 1.32's CPU kernel by
tests/test_nbits.py). The CPU kernel refuses 8-bit weights with float zero points, and runs 4-bit ones 8-200x
slower than the uint8 / default forms, so the emitter (nbits_graph.py) lowers float zero points as a symmetric
MatMulNBits plus a per-block offset term.

Speed on onnxruntime 1.32's CPU kernel (x86, decode-shaped x of one row): accuracy_level 4 (int8 activations, ~0.5%
relative error) is 2.5-20x faster than fp32 MatMul for 4-bit; accuracy_level 0 (fp32 compute, exact) is at best on
par with fp32, and 8-bit weights at accuracy_level 0-2 take ~100 ms for a 1536 x 576 weight (300x slower than fp32):
run 8-bit weights at accuracy_level 4 only.

Weights are quantized by onnxruntime's own quantizers (`quantize_weight`), or carried exactly from GGUF integer codes
(compressor/sources/gguf_codes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compressor.errors import UsageError

BITS = (4, 8)


@dataclass
class NBitsWeight:
    bits: int
    block_size: int
    n: int
    k: int
    packed: np.ndarray  # uint8 (n, k_blocks, block_size * bits // 8): MatMulNBits input B
    scales: np.ndarray  # float32 (n * k_blocks,)
    zero_points: np.ndarray | None  # uint8 packed like B, float32 (n * k_blocks,), or None (2^(bits-1))
    origin: str

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block_size)

    def codes(self) -> np.ndarray:
        """The integer codes, uint8 (n, k_blocks * block_size) (padding past k included)."""
        packed = self.packed.reshape(self.n, -1)
        if self.bits == 8:
            return packed.copy()
        out = np.empty((self.n, packed.shape[1] * 2), dtype=np.uint8)
        out[:, 0::2] = packed & 0x0F
        out[:, 1::2] = packed >> 4
        return out

    def zero_point_values(self) -> np.ndarray:
        """The zero point of each block as float32 (n, k_blocks)."""
        kb = self.k_blocks
        if self.zero_points is None:
            return np.full((self.n, kb), 2.0 ** (self.bits - 1), dtype=np.float32)
        if self.zero_points.dtype != np.uint8:
            return self.zero_points.astype(np.float32).reshape(self.n, kb)
        zp = self.zero_points.reshape(self.n, -1)
        if self.bits == 8:
            return zp[:, :kb].astype(np.float32)
        both = np.empty((self.n, zp.shape[1] * 2), dtype=np.uint8)
        both[:, 0::2] = zp & 0x0F
        both[:, 1::2] = zp >> 4
        return both[:, :kb].astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """float32 (n, k): (q - zp) * scale per block, as onnxruntime's MatMulNBits reads these inputs."""
        kb, bs = self.k_blocks, self.block_size
        q = self.codes().astype(np.float32).reshape(self.n, kb, bs)
        zp = self.zero_point_values()[:, :, None]
        scale = self.scales.astype(np.float32).reshape(self.n, kb)[:, :, None]
        return ((q - zp) * scale).reshape(self.n, kb * bs)[:, : self.k]

    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp

    def take_rows(self, rows: np.ndarray) -> "NBitsWeight":
        """The weight of the output rows `rows` (in that order): exact, since blocks run along k."""
        rows = np.asarray(rows)
        kb = self.k_blocks
        zp = self.zero_points
        if zp is not None:
            zp = zp.reshape(self.n, -1)[rows].reshape(-1)
        return NBitsWeight(self.bits, self.block_size, len(rows), self.k, self.packed[rows].copy(),
                           self.scales.reshape(self.n, kb)[rows].reshape(-1).copy(), zp, self.origin)


def check_block_size(k: int, bits: int, block_size: int) -> None:
    if bits not in BITS:
        raise UsageError(f"MatMulNBits weights take bits 4 or 8, not {bits}; pass bits=4 or bits=8")
    if block_size < 16 or block_size & (block_size - 1):
        raise UsageError(f"block size {block_size} is not a power of two >= 16; use 16, 32, 64 or 128")
    if k % block_size:
        raise UsageError(f"block size {block_size} does not divide the weight's input width {k}; use a power of two that divides {k} (e.g. 32)")


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """uint8 codes (n, k) with k a multiple of block_size -> MatMulNBits B (n, k_blocks, block_size * bits // 8)."""
    n, k = codes.shape
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes.reshape(n, k // block_size, block_size).copy()
    packed = (codes[:, 0::2] & 0x0F) | ((codes[:, 1::2] & 0x0F) << 4)
    return packed.reshape(n, k // block_size, block_size // 2).astype(np.uint8)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """uint8 zero points (n, k_blocks) -> MatMulNBits zero_points, flattened (4-bit: two per byte, rows padded)."""
    zp = zp.astype(np.uint8)
    if bits == 8:
        return zp.reshape(-1).copy()
    n, kb = zp.shape
    if kb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    return ((zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)).reshape(-1).astype(np.uint8)


def split_zero_points(weight: NBitsWeight) -> tuple[NBitsWeight, np.ndarray]:
    """(symmetric weight, offsets (n, k_blocks)) with W = symmetric.dequantize() + offsets spread over each block.

    (q - zp) s = (q - 2^(bits-1)) s + (2^(bits-1) - zp) s: the same codes and scales under the kernel's default zero
    point, plus one constant per block. onnxruntime 1.32's CPU kernel is 8-200x slower with float zero points than
    without (see `matmul_nbits_node`), so a float-zp weight is lowered as the symmetric MatMulNBits plus
    (x summed per block) @ offsets.T, two small MatMuls.
    """
    zp = weight.zero_point_values()
    offsets = ((2.0 ** (weight.bits - 1) - zp) * weight.scales.astype(np.float32).reshape(weight.n, -1)).astype(np.float32)
    sym = NBitsWeight(weight.bits, weight.block_size, weight.n, weight.k, weight.packed, weight.scales, None, weight.origin)
    return sym, offsets


def quantize_weight(w, bits: int = 4, block_size: int = 32, symmetric: bool = True, method: str = "rtn") -> NBitsWeight:
    """Quantize a float weight (n, k) with onnxruntime's own quantizers.

    method "rtn": the C++ quantize_matmul_4bits / quantize_matmul_8bits behind DefaultWeightOnlyQuantizer
    (symmetric: no zero points, the kernel's default 2^(bits-1); else packed uint8 zero points).
    method "hqq": HQQWeightOnlyQuantizer's half-quadratic solver (torch, as ORT calls it: the (n, k) weight, axis 1),
    float zero points; HQQ is always asymmetric, so `symmetric` is ignored.
    """
    w = np.asarray(w.detach().cpu().numpy() if hasattr(w, "detach") else w, dtype=np.float32)
    if w.ndim != 2:
        raise UsageError(f"quantize_weight takes a 2-D (n, k) weight, got shape {w.shape}; pass one linear's weight")
    n, k = w.shape
    check_block_size(k, bits, block_size)
    if method == "rtn":
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits))
        packed, scales, zp = quantizer.qbits_block_quant(np.ascontiguousarray(w.T))  # ORT takes the MatMul layout (k, n)
        return NBitsWeight(bits, block_size, n, k, packed, scales.reshape(-1).astype(np.float32),
                           None if symmetric else zp.reshape(-1), f"rtn {bits}-bit {'sym' if symmetric else 'asym'}")
    if method == "hqq":
        import torch
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

        quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
        with torch.no_grad():
            q, scales, zero = quantizer.quantize_internal(torch.from_numpy(w), bits=bits, group_size=block_size)
        codes = q.numpy().astype(np.uint8)
        return NBitsWeight(bits, block_size, n, k, pack_codes(codes, bits, block_size),
                           scales.numpy().reshape(-1).astype(np.float32), zero.numpy().reshape(-1).astype(np.float32),
                           f"hqq {bits}-bit")
    raise UsageError(f"unknown quantization method '{method}'; use 'rtn' or 'hqq'")
