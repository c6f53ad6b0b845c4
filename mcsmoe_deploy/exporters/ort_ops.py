"""Torch custom ops that trace to onnxruntime's fused ops, for the export target "ort".

Three ops, each with an eager torch reference (the semantics the fused graph must keep), a
fake (shapes only) and an ONNX translation that emits one bare onnxruntime node:

- `mcsmoe_ort::rms_norm`   -> `SimplifiedLayerNormalization` (ONNX domain, onnxruntime's
  contrib op; `passes.skip_norm` later folds a residual Add into
  `com.microsoft.SkipSimplifiedLayerNormalization`)
- `mcsmoe_ort::rotary`     -> `com.microsoft.RotaryEmbedding` (rotate-half, explicit position ids)
- `mcsmoe_ort::gqa`        -> `com.microsoft.GroupQueryAttention` (BNSH past/present, causal,
  optional local window, right-padded rows; rotary not inside: the caller rotates with explicit
  positions)

onnxscript needs an OpSchema to emit a node; the contrib schemas are built here and handed to
`onnxscript.values.Op` without registering them with onnx, except SimplifiedLayerNormalization:
it lives in the default domain, where onnx.checker rejects ops it has no schema for, so
`register_norm_schema` registers it (in this process; onnxruntime's own model builder writes the
same node).
"""

from __future__ import annotations

import torch

ORT_DOMAIN = "com.microsoft"
TORCH_NAMESPACE = "mcsmoe_ort"
NORM_OP = "SimplifiedLayerNormalization"


# ---------------------------------------------------------------------------------------------
# eager references and fakes


def rotate_half_reference(x: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          num_heads: int) -> torch.Tensor:
    """x [B, S, N*D] rotated (rotate-half, as transformers' apply_rotary_pos_emb); cos/sin [M, D/2]."""
    batch, seq, width = x.shape
    x = x.reshape(batch, seq, num_heads, width // num_heads)
    c, s = cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]  # [B, S, 1, D/2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).reshape(batch, seq, width)


@torch.library.custom_op(f"{TORCH_NAMESPACE}::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps), computed in float32 (transformers' RMSNorm)."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op(f"{TORCH_NAMESPACE}::rotary", mutates_args=())
def rotary(x: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           num_heads: int) -> torch.Tensor:
    """`rotate_half_reference`: x [B, S, N*D], position_ids [B, S] int64, cos/sin caches [M, D/2]."""
    return rotate_half_reference(x, position_ids, cos, sin, num_heads)


@rotary.register_fake
def _(x, position_ids, cos, sin, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op(f"{TORCH_NAMESPACE}::gqa", mutates_args=())
def gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
        seqlens_k: torch.Tensor, total_length: torch.Tensor, num_heads: int, kv_heads: int, scale: float,
        window: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal grouped-query attention over right-padded rows; (output [B, S, N*D], present k, v [B, kv, P+S, D]).

    q [B, S, N*D], k/v [B, S, kv*D], past k/v [B, kv, P, D]. Rows are right-padded, as onnxruntime's
    kernel reads them: row b holds seqlens_k[b] + 1 real positions after this step ([B] int32), its
    past's first seqlens_k[b] + 1 - S positions and then the S new ones (after an empty past: the S new
    ones at 0..S-1, of which the first seqlens_k[b] + 1 are real). total_length (int32 scalar) is the
    attention mask's width, P + S. A query at position t sees keys 0..t; with window > 0 only
    t - window + 1 .. t (onnxruntime's local_window_size, checked against its kernel). Positions past a
    row's length in present, and the outputs of padding queries, are not defined (zeros here).
    """
    batch, seq, _ = q.shape
    head_dim = q.shape[-1] // num_heads
    past = past_k.shape[2]
    new_k = k.reshape(batch, seq, kv_heads, head_dim).transpose(1, 2)
    new_v = v.reshape(batch, seq, kv_heads, head_dim).transpose(1, 2)
    present_k = past_k.new_zeros(batch, kv_heads, past + seq, head_dim)
    present_v = torch.zeros_like(present_k)
    groups = num_heads // kv_heads
    queries = q.reshape(batch, seq, num_heads, head_dim).transpose(1, 2)
    out = torch.zeros_like(queries)
    for row in range(batch):
        start = 0 if past == 0 else int(seqlens_k[row]) + 1 - seq  # where this row's new tokens go
        present_k[row, :, :start], present_v[row, :, :start] = past_k[row, :, :start], past_v[row, :, :start]
        present_k[row, :, start:start + seq], present_v[row, :, start:start + seq] = new_k[row], new_v[row]
        keys = present_k[row, :, :start + seq].repeat_interleave(groups, dim=0)
        values = present_v[row, :, :start + seq].repeat_interleave(groups, dim=0)
        scores = queries[row] @ keys.transpose(1, 2) * scale  # [N, S, start + S]
        query_pos = torch.arange(start, start + seq)[:, None]
        key_pos = torch.arange(start + seq)[None, :]
        blocked = key_pos > query_pos
        if window > 0:
            blocked = blocked | (key_pos <= query_pos - window)
        out[row] = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1) @ values
    return out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim), present_k, present_v


@gqa.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total_length, num_heads, kv_heads, scale, window=-1):
    batch, kv, past, head_dim = past_k.shape
    present = past_k.new_empty(batch, kv, past + k.shape[1], head_dim)
    return torch.empty_like(q), present, torch.empty_like(present)


# ---------------------------------------------------------------------------------------------
# ONNX translations


def _schema(name: str, domain: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
            attributes: list[tuple[str, int]]):
    """An onnx OpSchema (type constraints T float, I integer) for onnxscript; optional inputs end with '?'."""
    import onnx

    cls = onnx.defs.OpSchema
    optional = cls.FormalParameterOption.Optional

    def param(entry):
        name, type_str = entry
        if name.endswith("?"):
            return cls.FormalParameter(name[:-1], type_str, "", param_option=optional)
        return cls.FormalParameter(name, type_str, "")

    constraints = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                   ("I", ["tensor(int32)", "tensor(int64)"], "")]
    used = {t for _, t in inputs + outputs}
    return cls(name, domain, 1, "", inputs=[param(e) for e in inputs], outputs=[param(e) for e in outputs],
               type_constraints=[c for c in constraints if c[0] in used],
               attributes=[cls.Attribute(a, kind, "") for a, kind in attributes])


def _attr(kind: str):
    import onnx

    return getattr(onnx.defs.OpSchema.AttrType, kind)


_ops: dict[str, object] = {}


def _op(name: str):
    """The onnxscript Op emitting `name`, built once."""
    if name not in _ops:
        import onnxscript

        if name == NORM_OP:
            schema = norm_schema()
        elif name == "RotaryEmbedding":
            schema = _schema(name, ORT_DOMAIN, [("input", "T"), ("position_ids", "I"), ("cos_cache", "T"),
                                                 ("sin_cache", "T")], [("output", "T")],
                             [("interleaved", _attr("INT")), ("num_heads", _attr("INT"))])
        else:
            schema = _schema(
                name, ORT_DOMAIN,
                [("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"),
                 ("seqlens_k", "tensor(int32)"), ("total_sequence_length", "tensor(int32)"), ("cos_cache?", "T"),
                 ("sin_cache?", "T"), ("position_ids?", "tensor(int64)"), ("attention_bias?", "T"),
                 ("head_sink?", "T"), ("k_scale?", "tensor(float)"), ("v_scale?", "tensor(float)"),
                 ("q_norm_weight?", "T"), ("k_norm_weight?", "T"), ("query_seqlens?", "tensor(int32)")],
                [("output", "T"), ("present_key", "T"), ("present_value", "T")],
                [("num_heads", _attr("INT")), ("kv_num_heads", _attr("INT")), ("scale", _attr("FLOAT")),
                 ("local_window_size", _attr("INT"))],
            )
        _ops[name] = onnxscript.values.Op(onnxscript.values.Opset(schema.domain, 1), name, schema)
    return _ops[name]


def norm_schema():
    """onnxruntime's SimplifiedLayerNormalization (ONNX domain, version 1) as an onnx OpSchema, output Y only
    (onnxruntime's optional inv_std_var is left out: the graph never reads it)."""
    return _schema(NORM_OP, "", [("X", "T"), ("scale", "T")], [("Y", "T")],
                   [("axis", _attr("INT")), ("epsilon", _attr("FLOAT")), ("stash_type", _attr("INT"))])


def register_norm_schema() -> None:
    """Let onnx (checker, shape inference) accept SimplifiedLayerNormalization in the default domain; idempotent."""
    import onnx

    if not onnx.defs.has(NORM_OP, 1, ""):
        onnx.defs.register_schema(norm_schema())


def _translate_rms_norm(x, weight, eps):
    return _op(NORM_OP)(x, weight, axis=-1, epsilon=float(eps), stash_type=1)


def _translate_rotary(x, position_ids, cos, sin, num_heads):
    return _op("RotaryEmbedding")(x, position_ids, cos, sin, interleaved=0, num_heads=int(num_heads))


def _translate_gqa(q, k, v, past_k, past_v, seqlens_k, total_length, num_heads, kv_heads, scale, window=-1):
    # the optional cos/sin caches and position ids stay empty: rotary ran before, with our positions
    return _op("GroupQueryAttention")(
        q, k, v, past_k, past_v, seqlens_k, total_length,
        num_heads=int(num_heads), kv_num_heads=int(kv_heads), scale=float(scale), local_window_size=int(window),
        _num_outputs=3,
    )


def translation_table() -> dict:
    """The custom_translation_table entries for torch.onnx.export."""
    ops = torch.ops.mcsmoe_ort
    return {ops.rms_norm.default: _translate_rms_norm, ops.rotary.default: _translate_rotary,
            ops.gqa.default: _translate_gqa}


__all__ = ["ORT_DOMAIN", "NORM_OP", "gqa", "register_norm_schema", "rms_norm", "rotary", "rotate_half_reference",
           "translation_table"]
