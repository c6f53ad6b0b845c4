"""An embedding table stored as blockwise int4 / int8 codes: `QuantizedEmbedding`.

It replaces a model's input embeddings (`nn.Embedding`) when `--quantize-scope all+embeddings`
asks for them. The table [vocab, hidden] is held as a QuantizedLinear holds its weight
(quantization.py): `weight_codes [vocab, hidden * bits / 8]` uint8, `weight_scales
[vocab, hidden / block]` and, when asymmetric, `weight_zero_points` uint8; blocks run along
`hidden`, so a table tied to the LM head is the head's quantized weight itself: the two modules
share one set of buffers and the checkpoint stores it once. A lookup dequantizes only the rows
it reads:

    embedding(ids) = (codes[ids] - zero_point[ids]) * scale[ids]     blockwise along hidden

through the torch custom op `mcsmoe::quantized_embedding`, whose ONNX translation
(exporters/quantized_embedding_export) gathers the stored rows and dequantizes them with
standard ops: what the graph computes is this module's arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .quantization import QuantSpec, dequantize_stored, quantize
from .quantized_linear import QuantizedLinear, QuantizeWeight, replace_module

QUANTIZED_EMBEDDING_OP = "mcsmoe::quantized_embedding"


@torch.library.custom_op(QUANTIZED_EMBEDDING_OP, mutates_args=())
def quantized_embedding(
    ids: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int,
    block: int,
) -> torch.Tensor:
    """Rows `ids` [...] of a table [vocab, hidden] stored blockwise quantized -> [..., hidden] in the scales' dtype.

    codes [vocab, hidden * bits / 8] uint8 packed; scales [vocab, hidden / block]; zero_points the
    same shape uint8, or None (symmetric: 2^(bits - 1)).
    """
    spec = QuantSpec(bits, block, zero_points is None)
    flat = ids.reshape(-1)
    rows = dequantize_stored(spec, codes[flat], scales[flat], None if zero_points is None else zero_points[flat])
    return rows.reshape(*ids.shape, rows.shape[-1])


@quantized_embedding.register_fake
def _(ids, codes, scales, zero_points, bits, block):
    return scales.new_empty((*ids.shape, codes.shape[1] * 8 // bits))


class QuantizedEmbedding(nn.Module):
    """`nn.Embedding(num_embeddings, embedding_dim)` with its table quantized by `spec` (module docstring).

    output_dtype: the dtype of the rows it returns (the model's; the scales stay float32 whatever
    the model's dtype, see checkpoint.cast_to_stored_dtype). `shares_codes_with`: the name of the
    QuantizedLinear (the LM head) whose buffers this table is, or None.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, padding_idx: int | None = None):
        super().__init__()
        spec.check_shape((num_embeddings, embedding_dim), "embedding table")
        self.num_embeddings, self.embedding_dim, self.spec = num_embeddings, embedding_dim, spec
        self.padding_idx = padding_idx  # kept for code that reads it; the rows are what was quantized
        self.output_dtype = dtype
        self.shares_codes_with: str | None = None
        blocks = embedding_dim // spec.block
        self.register_buffer("weight_codes", torch.zeros(num_embeddings, embedding_dim * spec.bits // 8,
                                                         dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales", torch.zeros(num_embeddings, blocks, dtype=torch.float32, device=device))
        zero_points = (None if spec.symmetric
                       else torch.zeros(num_embeddings, blocks, dtype=torch.uint8, device=device))
        self.register_buffer("weight_zero_points", zero_points)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec, quantize_weight: QuantizeWeight = quantize
                       ) -> QuantizedEmbedding:
        """`embedding` with its table quantized by `quantize_weight` (default: round to nearest, row blocks
        along hidden). UserError when `spec.block` does not divide the hidden size."""
        table = embedding.weight.detach()
        module = cls(embedding.num_embeddings, embedding.embedding_dim, spec, table.dtype, table.device,
                     embedding.padding_idx)
        quantized = quantize_weight(table.float(), spec)
        with torch.no_grad():
            module.weight_codes.copy_(quantized.packed_codes())
            module.weight_scales.copy_(quantized.scales)
            if module.weight_zero_points is not None:
                module.weight_zero_points.copy_(quantized.zero_points)
        return module

    @classmethod
    def sharing(cls, head: QuantizedLinear, head_name: str, dtype: torch.dtype = torch.float32,
                padding_idx: int | None = None) -> QuantizedEmbedding:
        """The table of a tied LM head: `head`'s own buffers (W [vocab, hidden] quantized along hidden),
        not a copy."""
        module = cls(head.out_features, head.in_features, head.spec, dtype, "meta", padding_idx)
        module.share_buffers(head, head_name)
        return module

    def share_buffers(self, head: QuantizedLinear, head_name: str) -> None:
        """Make `head`'s codes, scales and zero points this table's (after loading a checkpoint that stores them once)."""
        if head.spec != self.spec or (head.out_features, head.in_features) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"{head_name} ({head.spec}, {[head.out_features, head.in_features]}) cannot be the table "
                             f"of a {self.spec} embedding of {[self.num_embeddings, self.embedding_dim]}")
        self.weight_codes = head.weight_codes
        self.weight_scales = head.weight_scales
        self.weight_zero_points = head.weight_zero_points
        self.shares_codes_with = head_name

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The table [vocab, hidden] = (codes - zero point) * scale, in `dtype` (default: output_dtype)."""
        return dequantize_stored(self.spec, self.weight_codes, self.weight_scales, self.weight_zero_points,
                                 dtype or self.output_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] int64 -> rows [..., hidden] in output_dtype."""
        rows = torch.ops.mcsmoe.quantized_embedding(ids, self.weight_codes, self.weight_scales,
                                                    self.weight_zero_points, self.spec.bits, self.spec.block)
        return rows if rows.dtype == self.output_dtype else rows.to(self.output_dtype)

    def extra_repr(self) -> str:
        shared = f", shares the codes of {self.shares_codes_with}" if self.shares_codes_with else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.name}, block={self.spec.block}, "
                f"symmetric={self.spec.symmetric}{shared}")


def _input_embeddings_name(model: nn.Module) -> tuple[str, nn.Module]:
    embedding = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embedding:
            return name, module
    raise ValueError("the model's input embeddings are not one of its modules")


def check_quantizable_embeddings(model: nn.Module, spec: QuantSpec) -> None:
    """UserError (one line) unless `model`'s input embeddings are an nn.Embedding whose hidden size `spec.block`
    divides."""
    name, embedding = _input_embeddings_name(model)
    if not isinstance(embedding, (nn.Embedding, QuantizedEmbedding)):
        raise UserError(f"{name} is a {type(embedding).__name__}, not an embedding table; it cannot be quantized")
    if embedding.embedding_dim % spec.block:
        raise UserError(f"quantization block {spec.block} does not divide the hidden size {embedding.embedding_dim} "
                        f"of {name}")


def quantize_input_embeddings(model: nn.Module, spec: QuantSpec, tied_head: str | None = None,
                              quantize_weight: QuantizeWeight = quantize) -> str:
    """Replace `model`'s input embeddings by a QuantizedEmbedding, in place; returns their module name.

    tied_head: the name of a QuantizedLinear LM head that was tied to these embeddings before it was
    quantized: the table becomes that head's quantized weight (one set of codes for both, as the
    tie had one float table). None: the table is quantized on its own by `quantize_weight`.
    """
    check_quantizable_embeddings(model, spec)
    name, embedding = _input_embeddings_name(model)
    if tied_head is not None:
        head = model.get_submodule(tied_head)
        if not isinstance(head, QuantizedLinear) or head.spec != spec:
            raise ValueError(f"{tied_head} is not a QuantizedLinear of {spec}")
        module = QuantizedEmbedding.sharing(head, tied_head, embedding.weight.dtype, embedding.padding_idx)
    else:
        module = QuantizedEmbedding.from_embedding(embedding, spec, quantize_weight)
    replace_module(model, name, module)
    return name


def quantized_embedding_specs(model: nn.Module) -> dict[str, dict]:
    """{module name: spec dict, plus "shares_codes_with" when tied} of every QuantizedEmbedding of `model`:
    what the checkpoint's "mcsmoe" section records."""
    return {name: {**module.spec.to_dict(), **({"shares_codes_with": module.shares_codes_with}
                                               if module.shares_codes_with else {})}
            for name, module in model.named_modules() if isinstance(module, QuantizedEmbedding)}


def install_quantized_embeddings(model: nn.Module, described: dict[str, dict]) -> None:
    """Replace each embedding named in `described` (as `quantized_embedding_specs` writes it) by an empty
    QuantizedEmbedding on the meta device, for `load_state_dict(assign=True)` to fill; a table sharing
    a head's codes gets them from `share_quantized_tables` once the head is loaded."""
    for name, entry in described.items():
        embedding = model.get_submodule(name)
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"{name} is a {type(embedding).__name__}, not an embedding table")
        spec = QuantSpec.from_dict(entry)
        module = QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim, spec, embedding.weight.dtype,
                                    "meta", embedding.padding_idx)
        module.shares_codes_with = entry.get("shares_codes_with")
        replace_module(model, name, module)


def share_quantized_tables(model: nn.Module) -> None:
    """Point every QuantizedEmbedding that shares a head's codes at that head's buffers (after loading)."""
    for module in model.modules():
        if isinstance(module, QuantizedEmbedding) and module.shares_codes_with:
            module.share_buffers(model.get_submodule(module.shares_codes_with), module.shares_codes_with)


def shared_table_buffers(model: nn.Module) -> set[str]:
    """State-dict names of the buffers of QuantizedEmbeddings that are another module's: saved once, by their owner."""
    return {f"{name}.{buffer}" for name, module in model.named_modules()
            if isinstance(module, QuantizedEmbedding) and module.shares_codes_with
            for buffer, _ in module.named_buffers(recurse=False)}


__all__ = [
    "QUANTIZED_EMBEDDING_OP",
    "QuantizedEmbedding",
    "check_quantizable_embeddings",
    "install_quantized_embeddings",
    "quantize_input_embeddings",
    "quantized_embedding",
    "quantized_embedding_specs",
    "share_quantized_tables",
    "shared_table_buffers",
]
