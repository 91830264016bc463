"""The one MatMulNBits emitter: an NBitsWeight (nbits.py) as graph nodes, for the decoder lowering and the tests.

A weight with float zero points (GGUF Q4_1 / Q4_K block minimums, HQQ) is not run on them: onnxruntime 1.32's CPU
kernel is 8-200x slower with float zero points than without. It is split (nbits.split_zero_points) into the same
codes under the kernel's default zero point plus one constant c per block, and c's term, x's block sums times c, is
computed one of two ways (`minimums`):

- "fp32": beside the kernel, MatMul (block sums, shared by the linears reading x) + MatMul + Add (exact to float
  rounding; three small operators per linear: about a fifth of a SmolLM2 decode step on 2 cores);
- "int8": inside the same kernel, as extra input blocks: the input becomes [x, block sums, block sums / 16] and each
  c two 4-bit digits (minimum_digits), so the linear stays one fast MatMulNBits plus a shared block-sum kernel and a
  Concat. The minimums carry about 8 bits (max |c| / 119 per group of block_size minimums); measured on SmolLM2:
  perplexity 1.003x dense against the exact graph's 1.005x, and no decode gain on 2 cores (the shared block-sum
  kernel and the Concat cost what the side matmuls did).
"""

from __future__ import annotations

import numpy as np

from compressor.errors import UsageError
from compressor.lower.graph_builder import MS, GraphBuilder
from compressor.lower.nbits import NBitsWeight, pack_codes, split_zero_points

MINIMUMS = ("fp32", "int8", "native")


def emit_matmul_nbits(g: GraphBuilder, x: str, name: str, nbits: NBitsWeight, accuracy_level: int = 0,
                      bias: np.ndarray | None = None, minimums: str = "fp32") -> str:
    """y = x @ W.T (+ bias) for W = nbits.dequantize(); returns y's name. `minimums`: how float zero points run
    ("fp32" / "int8" above; "native": passed to the kernel as they are, its slow path)."""
    if minimums not in MINIMUMS:
        raise UsageError(f"minimums must be one of {list(MINIMUMS)}, not '{minimums}'")
    offsets = None
    if nbits.zero_points is not None and nbits.zero_points.dtype != np.uint8 and minimums != "native":
        nbits, offsets = split_zero_points(nbits)
        if minimums == "int8":
            nbits, width = minimum_digits(nbits, offsets)
            x, offsets = with_block_sums(g, x, name, nbits.k - width, nbits.block_size, width, accuracy_level), None
    inputs = [x, g.init(f"{name}.qweight", nbits.packed), g.init(f"{name}.scales", nbits.scales)]
    if nbits.zero_points is not None:
        zp = nbits.zero_points
        inputs.append(g.init(f"{name}.zero_points", zp if zp.dtype == np.uint8 else zp.astype(np.float32)))
    else:
        inputs.append("")
    if bias is not None:
        inputs += ["", g.init(f"{name}.bias", np.asarray(bias, np.float32))]  # g_idx unused
    while inputs and inputs[-1] == "":
        inputs.pop()
    y = g.op("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS, K=nbits.k, N=nbits.n, bits=nbits.bits,
             block_size=nbits.block_size, accuracy_level=accuracy_level)
    if offsets is not None:
        y = g.op("Add", [y, block_offsets(g, x, name, nbits, offsets)], f"{name}/AddOffsets")
    return y


def matmul_nbits_node(x_name: str, weight: NBitsWeight, prefix: str, accuracy_level: int = 0,
                      bias: np.ndarray | None = None, minimums: str = "fp32"):
    """(nodes, initializers, output name) of emit_matmul_nbits on a fresh graph: one linear, for tests and tools."""
    g = GraphBuilder()
    out = emit_matmul_nbits(g, x_name, prefix, weight, accuracy_level, bias, minimums)
    return g.nodes, g.inits, out


def minimum_digits(nbits: NBitsWeight, offsets: np.ndarray) -> tuple[NBitsWeight, int]:
    """The symmetric weight with its per-block minimums appended as extra input blocks: (weight over [x, sums, sums/16],
    extra inputs). Minimum c of block b is stored as two 4-bit digits, c ~ s * (a + r / 16) with a, r in [-8, 7] and s
    one scale per `block_size` minimums: a multiplies x's block sum, r its sixteenth, so one MatMulNBits on the fast
    path (no zero points) computes x @ W.T exactly up to the minimums' rounding (max |c| / 119, about 8 bits)."""
    n, bs, kb = nbits.n, nbits.block_size, nbits.k_blocks
    groups = -(-kb // bs)
    c = np.zeros((n, groups * bs), np.float64)
    c[:, :kb] = offsets.reshape(n, kb)
    c = c.reshape(n, groups, bs)
    scale = np.abs(c).max(axis=2, keepdims=True) / (119 / 16)
    scale[scale == 0] = 1.0
    u = np.clip(np.round(c / scale * 16), -119, 119).astype(np.int64)
    a = (u + 8) // 16
    r = u - 16 * a
    codes = np.concatenate([(a + 8).reshape(n, -1), (r + 8).reshape(n, -1)], axis=1).astype(np.uint8)
    extra = pack_codes(codes, 4, bs)  # (n, 2 * groups, bs / 2)
    scales = np.concatenate([nbits.scales.reshape(n, kb), np.tile(scale[:, :, 0], 2)], axis=1).astype(np.float32)
    width = 2 * groups * bs
    weight = NBitsWeight(4, bs, n, nbits.k + width, np.concatenate([nbits.packed, extra], axis=1),
                         scales.reshape(-1), None, nbits.origin)
    return weight, width


def with_block_sums(g: GraphBuilder, x: str, name: str, k: int, block_size: int, width: int, accuracy_level: int) -> str:
    """[x, x's block sums, the sums / 16] (zero padded to `width` extra columns): the input `minimum_digits` weights
    read, shared by the linears that read x. The sums come from a 4-bit MatMulNBits against a block indicator (codes
    9 and 8 around the default zero point 8: entries 1 and 0; scale 1/16 for the second half), exact in 4 bits and
    on the same fast kernel: an FP32 MatMul here cost as much as the side path it replaces."""
    key = ("with_block_sums", x, k, block_size, width)
    if key not in g.memo:
        table = ("digit_indicator", k, block_size, width)  # one pair of initializers per shape, for the whole graph
        if table not in g.memo:
            blocks = k // block_size
            codes = np.full((width, k), 8, np.uint8)
            rows = np.arange(blocks)
            for half in (0, width // 2):
                codes[half + rows] = np.where(np.arange(k)[None, :] // block_size == rows[:, None], 9, 8)
            scales = np.ones((width, blocks), np.float32)
            scales[width // 2:] = 1.0 / 16
            tag = f"digit_indicator.{k}x{block_size}x{width}"
            g.memo[table] = (g.init(tag, pack_codes(codes, 4, block_size)), g.init(f"{tag}.scales", scales.reshape(-1)))
        sums = g.op("MatMulNBits", [x, *g.memo[table]], f"{name}/BlockSums", domain=MS, K=k, N=width, bits=4,
                    block_size=block_size, accuracy_level=accuracy_level)
        g.memo[key] = g.op("Concat", [x, sums], f"{name}/WithBlockSums", axis=-1)
    return g.memo[key]


def block_offsets(g: GraphBuilder, x: str, name: str, nbits: NBitsWeight, offsets: np.ndarray) -> str:
    """The constant-per-block part c in FP32: x's block sums (x @ a 0 / 1 block indicator, any rank of x, shared by
    the linears reading x) times c."""
    blocks = nbits.k // nbits.block_size
    key = ("block_sums", x, nbits.k, nbits.block_size)
    if key not in g.memo:
        table = ("block_indicator", nbits.k, nbits.block_size)  # one initializer per shape, for the whole graph
        if table not in g.memo:
            indicator = np.zeros((nbits.k, blocks), np.float32)
            indicator[np.arange(nbits.k), np.arange(nbits.k) // nbits.block_size] = 1.0
            g.memo[table] = g.init(f"block_indicator.{nbits.k}x{nbits.block_size}", indicator)
        g.memo[key] = g.op("MatMul", [x, g.memo[table]], f"{name}/BlockSums")
    return g.op("MatMul", [g.memo[key], g.init(f"{name}.offsets_t", np.ascontiguousarray(offsets.reshape(nbits.n, blocks).T))],
                f"{name}/Offsets")
