"""A linear layer whose weight is stored as blockwise int4 / int8 codes: `QuantizedLinear`.

It replaces an `nn.Linear` (attention projections, a shared expert, the LM head) when a model is
quantized beyond its experts. The weight [out, in] is held as quantization.py stores it:
`weight_codes [out, in * bits / 8]` uint8 (int4 two per byte), `weight_scales [out, in / block]`
and, when asymmetric, `weight_zero_points [out, in / block]` uint8 (buffers, saved with the
model); the bias, if any, stays a float parameter. The forward computes

    y = x @ dequantize(W).T + b

through the torch custom op `mcsmoe::quantized_matmul` (x @ dequantize(W).T), whose ONNX
translation (exporters/quantized_linear_export) becomes a blocked DequantizeLinear + MatMul:
what the graph computes is this module's arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import UserError
from .quantization import QuantizedWeight, QuantSpec, dequantize_stored, quantize

QUANTIZED_MATMUL_OP = "mcsmoe::quantized_matmul"

# the one quantize-a-weight entry point: W [out, in] -> codes, scales, zero points (round to nearest
# by default; another method, e.g. error feedback, passes its own function of the same signature)
QuantizeWeight = Callable[[torch.Tensor, QuantSpec], QuantizedWeight]


@torch.library.custom_op(QUANTIZED_MATMUL_OP, mutates_args=())
def quantized_matmul(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int, block: int
) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out] with W [out, in] = (codes - zero point) * scale, blockwise along `in`.

    codes [out, in * bits / 8] uint8 packed; scales [out, in / block]; zero_points the same
    shape uint8, or None (symmetric: 2^(bits - 1)).
    """
    spec = QuantSpec(bits, block, zero_points is None)
    return x @ dequantize_stored(spec, codes, scales, zero_points, x.dtype).T


@quantized_matmul.register_fake
def _(x, codes, scales, zero_points, bits, block):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


class QuantizedLinear(nn.Module):
    """`nn.Linear(in_features, out_features, bias)` with its weight quantized by `spec` (see the module docstring).

    Built empty (zeros) with `device="meta"` allowed, to be filled by `load_state_dict`; or from a
    float layer with `from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        spec.check_shape((out_features, in_features))
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        blocks = in_features // spec.block
        # codes and scales are not trained: buffers, saved with the model
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features * spec.bits // 8,
                                                         dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, blocks, dtype=dtype, device=device))
        zero_points = None if spec.symmetric else torch.zeros(out_features, blocks, dtype=torch.uint8, device=device)
        self.register_buffer("weight_zero_points", zero_points)  # None: symmetric, not saved
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, quantize_weight: QuantizeWeight = quantize
                    ) -> QuantizedLinear:
        """`linear` with its weight quantized by `quantize_weight` (default: round to nearest); the bias
        is copied. UserError when `spec.block` does not divide `linear.in_features`."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec, weight.dtype,
                     weight.device)
        module.load_quantized(quantize_weight(weight, spec))
        if linear.bias is not None:
            with torch.no_grad():
                module.bias.copy_(linear.bias)
        return module

    def load_quantized(self, quantized: QuantizedWeight) -> None:
        """Store `quantized` (a weight [out, in] quantized by this layer's spec) as this layer's weight."""
        if quantized.spec != self.spec or quantized.shape != (self.out_features, self.in_features):
            raise ValueError(f"a {quantized.spec} weight of shape {list(quantized.shape)} for a {self.spec} layer "
                             f"of shape {[self.out_features, self.in_features]}")
        with torch.no_grad():
            self.weight_codes.copy_(quantized.packed_codes())
            self.weight_scales.copy_(quantized.scales)
            if self.weight_zero_points is not None:
                self.weight_zero_points.copy_(quantized.zero_points)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] = (codes - zero point) * scale, in `dtype` (default: the scales' dtype)."""
        return dequantize_stored(self.spec, self.weight_codes, self.weight_scales, self.weight_zero_points, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]: x @ dequantize(W).T + b."""
        y = torch.ops.mcsmoe.quantized_matmul(x, self.weight_codes, self.weight_scales, self.weight_zero_points,
                                              self.spec.bits, self.spec.block)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.spec.name}, block={self.spec.block}, symmetric={self.spec.symmetric}")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `model`'s submodule `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _untie_output_embeddings(model: nn.Module, name: str) -> None:
    """The LM head gets its own (quantized) weight; the input embeddings stay float, so they are no longer tied."""
    config = getattr(model, "config", None)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is not None and output is model.get_submodule(name) and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def quantize_linears(model: nn.Module, names: list[str], spec: QuantSpec,
                     quantize_weight: QuantizeWeight = quantize) -> None:
    """Replace each `nn.Linear` of `model` named in `names` by its `QuantizedLinear`, in place.

    An LM head tied to the input embeddings is untied (config.tie_word_embeddings = False):
    the embeddings stay float. UserError (naming the layer) when `spec.block` does not divide
    a layer's input size; checked for every layer before any is replaced.
    """
    check_quantizable_linears(model, names, spec)
    for name in names:
        linear = model.get_submodule(name)
        _untie_output_embeddings(model, name)
        replace_module(model, name, QuantizedLinear.from_linear(linear, spec, quantize_weight))


def check_quantizable_linears(model: nn.Module, names: list[str], spec: QuantSpec) -> None:
    """UserError naming the first layer in `names` that is not an nn.Linear whose input size `spec.block` divides."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{name} is a {type(linear).__name__}, not a linear layer; it cannot be quantized")
        if linear.in_features % spec.block:
            raise UserError(f"quantization block {spec.block} does not divide the input size {linear.in_features} "
                            f"of {name}")


def quantized_linear_specs(model: nn.Module) -> dict[str, QuantSpec]:
    """{module name: spec} of every QuantizedLinear of `model`, in module order."""
    return {name: module.spec for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def install_quantized_linears(model: nn.Module, specs: dict[str, QuantSpec], device: str | None = "meta") -> None:
    """Replace each nn.Linear named in `specs` by an empty QuantizedLinear of its shape (on `device`, for
    `load_state_dict(assign=True)` to fill); untie a quantized LM head as `quantize_linears` does."""
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not a linear layer")
        _untie_output_embeddings(model, name)
        replace_module(model, name, QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                                    spec, linear.weight.dtype, device))


__all__ = [
    "QUANTIZED_MATMUL_OP",
    "QuantizeWeight",
    "QuantizedLinear",
    "check_quantizable_linears",
    "install_quantized_linears",
    "quantize_linears",
    "quantized_linear_specs",
    "quantized_matmul",
    "replace_module",
]
