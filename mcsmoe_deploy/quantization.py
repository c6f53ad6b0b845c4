"""Blockwise weight quantization (int4 / int8), round to nearest: the arithmetic every other stage relies on.

A weight W [out, in] is cut along `in` into blocks of `block` values; each (row, block) gets
one scale and, when asymmetric, one zero point. Codes are unsigned, q in [0, 2^bits - 1],
and a weight is restored as

    W ~= (q - zero_point) * scale

with zero_point = 2^(bits - 1) for symmetric quantization (8 for int4, 128 for int8). This is
the convention of onnxruntime's `com.microsoft.MatMulNBits` (whose absent zero point means
2^(bits - 1)) and of ONNX's blocked `DequantizeLinear` on uint4 / uint8, so a checkpoint's
codes go into a graph unchanged and `dequantize` computes exactly what the graph computes.

Symmetric: scale = max|block| / (2^(bits-1) - 1), codes clamped to [1, 2^bits - 1] around the
zero point (the most negative code is left unused, so +x and -x quantize alike).
Asymmetric: the block's range [min(block, 0), max(block, 0)] is mapped onto [0, 2^bits - 1];
the zero point is the code of 0.0, so zeros (padding, pruned rows) stay exact.
Rounding is half to even, as in numpy, torch and ONNX's QuantizeLinear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

BITS = (4, 8)
DEFAULT_BLOCK = 32


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: bits per code, values per block along the input dimension, symmetric or not."""

    bits: int = 4
    block: int = DEFAULT_BLOCK
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise UserError(f"quantization bits must be one of {', '.join(map(str, BITS))}, not {self.bits}")
        if self.block < 16 or self.block & (self.block - 1):
            raise UserError(f"quantization block must be a power of two >= 16, not {self.block}")

    @property
    def name(self) -> str:
        """"int4", "int8"."""
        return f"int{self.bits}"

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def symmetric_zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def check_shape(self, shape: tuple[int, ...], what: str = "weight") -> None:
        """UserError unless `shape` is [out, in] with `in` a multiple of the block."""
        if len(shape) != 2 or shape[1] % self.block:
            raise UserError(f"{what} of shape {list(shape)}: quantization block {self.block} does not divide its "
                            f"input size {shape[-1]}")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block": self.block, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        return cls(int(data["bits"]), int(data["block"]), bool(data["symmetric"]))


@dataclass
class QuantizedWeight:
    """A weight [out, in] as codes, scales and zero points.

    codes [out, in] uint8 (one code per byte in memory; `pack` halves int4 for storage),
    scales [out, in / block] in the weight's float dtype, zero_points [out, in / block] uint8
    (None when symmetric: 2^(bits - 1) everywhere).
    """

    spec: QuantSpec
    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def packed_codes(self) -> torch.Tensor:
        """The codes as stored: [out, in * bits / 8] uint8 (see `pack_codes`)."""
        return pack_codes(self.codes, self.spec.bits)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W ~= (codes - zero_point) * scale, [out, in], in `dtype` (default: the scales' dtype)."""
        return dequantize(self, dtype)

    def nbytes(self) -> int:
        """Bytes this weight takes stored: packed codes, scales and zero points."""
        out, inp = self.shape
        code_bytes = out * inp * self.spec.bits // 8
        zero_bytes = 0 if self.zero_points is None else self.zero_points.numel() * self.spec.bits // 8
        return code_bytes + self.scales.numel() * self.scales.element_size() + zero_bytes


def _blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    out, inp = weight.shape
    return weight.reshape(out, inp // block, block)


def block_grid(blocks: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grid of each block of `blocks` [..., block] (float32): scales [...] in `dtype` and, when
    asymmetric, zero points [...] uint8 (None when symmetric)."""
    if spec.symmetric:
        half = spec.symmetric_zero_point - 1  # 7 for int4, 127 for int8
        return (blocks.abs().amax(dim=-1) / half).to(dtype), None
    low = blocks.amin(dim=-1).clamp(max=0)
    high = blocks.amax(dim=-1).clamp(min=0)
    scales = ((high - low) / spec.max_code).to(dtype)
    zero = torch.round(-low / _divisor(scales)).clamp(0, spec.max_code)
    return scales, zero.to(torch.uint8)


def _divisor(scales: torch.Tensor) -> torch.Tensor:
    """The scales as float32 divisors; an all-zero block (scale 0) divides by 1, and its codes restore 0."""
    return torch.where(scales == 0, torch.ones_like(scales), scales).float()


def round_to_grid(
    values: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Codes [..., n] uint8 of `values` [..., n] on a given grid: scales [...] and zero points [...]
    (None: symmetric), rounded to nearest (half to even) in float32 and clamped to the code range."""
    scaled = torch.round(values.float() / _divisor(scales)[..., None])
    if spec.symmetric:
        half = spec.symmetric_zero_point - 1
        codes = scaled.clamp(-half, half) + spec.symmetric_zero_point
    else:
        codes = (scaled + zero_points.float()[..., None]).clamp(0, spec.max_code)
    return codes.to(torch.uint8)


def quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest blockwise quantization of `weight` [out, in] (see the module docstring).

    Computed in float32; scales are returned in the weight's dtype, and the codes are chosen
    for those (rounded) scales, so dequantize(quantize(W)) is the nearest grid point the
    stored scale allows.
    """
    spec.check_shape(tuple(weight.shape))
    blocks = _blocks(weight.detach().float(), spec.block)
    scales, zero_points = block_grid(blocks, spec, weight.dtype)
    codes = round_to_grid(blocks, scales, zero_points, spec)
    return QuantizedWeight(spec, codes.reshape(weight.shape), scales, zero_points)


def dequantize(quantized: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(codes - zero_point) * scale as [out, in]: the exact arithmetic of the graph's DequantizeLinear."""
    spec = quantized.spec
    zero = (quantized.zero_points.float() if quantized.zero_points is not None
            else torch.full(quantized.scales.shape, float(spec.symmetric_zero_point)))
    codes = _blocks(quantized.codes.float(), spec.block)
    values = (codes - zero[..., None]) * quantized.scales.float()[..., None]
    return values.reshape(quantized.shape).to(dtype or quantized.scales.dtype)


def dequantize_stored(
    spec: QuantSpec, packed_codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A weight [out, in] from its stored form: packed codes [out, in * bits / 8], scales and zero points
    [out, in / block] (None: symmetric)."""
    return dequantize(QuantizedWeight(spec, unpack_codes(packed_codes, spec.bits), scales, zero_points), dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., n] uint8 -> storage bytes: int8 as is; int4 two per byte, the first in the low nibble
    (ONNX's uint4 packing and MatMulNBits' B layout). n must be even for int4."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if codes.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of codes per row")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`."""
    if bits == 8:
        return packed.to(torch.uint8)
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


__all__ = [
    "BITS",
    "DEFAULT_BLOCK",
    "QuantSpec",
    "QuantizedWeight",
    "block_grid",
    "dequantize",
    "dequantize_stored",
    "pack_codes",
    "quantize",
    "round_to_grid",
    "unpack_codes",
]
