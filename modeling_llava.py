"""LLaVA building blocks as plain nn.Modules: CLIP-style ViT, MLP projector, Llama decoder, Llava.

No I/O, no backend code, no config parsing (model.py builds these from the yaml `model:` section).

Module and parameter names follow Cerebras ModelZoo's CS layout, so `Llava().state_dict()` is a
ModelZoo LLaVA state dict by construction:

    image_model.embedding_layer.{linear_proj, cls_embedding, position_embeddings, post_embed_ln}
    image_model.encoder.transformer_encoder.layers.{i}.{self_attn, norm1, norm2, ffn}
    image_model.encoder.transformer_encoder.norm
    text_model.embedding_layer.word_embeddings
    text_model.transformer_decoder.layers.{i}.{self_attn, norm1, norm3, ffn}
    text_model.transformer_decoder.norm  (also registered as text_model.ln_f)
    text_model.lm_head
    projector_image_model.ffn.{i}.linear_layer

Conventions that differ from Hugging Face (the converter in convert_checkpoint.py bridges them):
- the CLS row of the ViT position table is stored LAST (HF: first);
- rotary embeddings pair neighbouring channels (x0, x1), (x2, x3), ... (HF Llama: x_i with x_{i+d/2}).

Usage:
    python -c "import modeling_llava"   # nothing to run: model.py assembles and trains these
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# Activation names as they appear in Cerebras configs. "swiglu" is handled by FeedForwardLayer
# (it needs the second, gating projection), the others are plain elementwise functions.
ACTIVATIONS = {
    None: lambda x: x,
    "linear": lambda x: x,
    "gelu": F.gelu,  # exact (erf) GELU, as LLaVA's mlp2x_gelu projector
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # the same tanh approximation, under its older name
    "quick_gelu": quick_gelu,  # CLIP
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
GLU_ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu}


class FeedForwardLayer(nn.Module):
    """Linear + activation; for gated activations `linear_layer(x) * act(linear_layer_for_glu(x))`."""

    def __init__(self, in_features: int, out_features: int, activation: Optional[str], bias: bool):
        super().__init__()
        if activation not in ACTIVATIONS and activation not in GLU_ACTIVATIONS:
            valid = sorted(str(k) for k in list(ACTIVATIONS) + list(GLU_ACTIVATIONS))
            raise ValueError(f"Unknown activation {activation!r}; valid: {valid}")
        self.activation = activation
        self.linear_layer = nn.Linear(in_features, out_features, bias=bias)
        if activation in GLU_ACTIVATIONS:
            self.linear_layer_for_glu = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation in GLU_ACTIVATIONS:
            return self.linear_layer(x) * GLU_ACTIVATIONS[self.activation](self.linear_layer_for_glu(x))
        return ACTIVATIONS[self.activation](self.linear_layer(x))


class FeedForwardNetwork(nn.Module):
    """A stack of FeedForwardLayers: input_unit -> layers_units[0] -> ... -> layers_units[-1]."""

    def __init__(self, input_unit: int, layers_units: Sequence[int], layers_activation: Sequence[Optional[str]],
                 use_bias: bool, dropout_rate: float = 0.0):
        super().__init__()
        if len(layers_units) != len(layers_activation):
            raise ValueError(f"layers_units {list(layers_units)} and layers_activation {list(layers_activation)} "
                             "must have the same length")
        sizes = [input_unit, *layers_units]
        self.ffn = nn.ModuleList(
            FeedForwardLayer(sizes[i], sizes[i + 1], layers_activation[i], use_bias) for i in range(len(layers_units))
        )
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.ffn):
            x = layer(x)
            if i < len(self.ffn) - 1:
                x = self.dropout(x)
        return x


class RMSNorm(nn.Module):
    """Llama RMSNorm: the variance is computed in fp32, the result cast back before the weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(rotary_dim: int, theta: float, llama3_scaling: Optional[dict], device
                             ) -> torch.Tensor:
    """RoPE frequencies theta^(-2i/d), i < d/2, in fp32.

    llama3_scaling {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings} (Llama-3.1 and
    later): wavelengths longer than original / low_freq_factor are stretched by `factor`, those shorter than
    original / high_freq_factor are kept, and the band between blends the two linearly in original / wavelength."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    if not llama3_scaling:
        return inv_freq
    factor = float(llama3_scaling["factor"])
    low, high = float(llama3_scaling["low_freq_factor"]), float(llama3_scaling["high_freq_factor"])
    original = float(llama3_scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: stretched, 1: kept
    stretched = inv_freq / factor
    mixed = (1 - blend) * stretched + blend * inv_freq
    return torch.where(wavelength > original / low, stretched,
                       torch.where(wavelength < original / high, inv_freq, mixed))


def rotary_tables(seq_len: int, inv_freq: torch.Tensor, scaling: float, dtype):
    """cos/sin tables [seq_len, rotary_dim/2] for positions 0..seq_len-1 (positions divided by `scaling`)."""
    pos = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32) / scaling
    angles = torch.outer(pos, inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_for_positions(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    """cos/sin [B, 1, S, rotary_dim/2] for per-token positions [B, S] (packed rows: every sample from 0).

    The same arithmetic as rotary_tables, so a token at position p gets bit-identical angles either way."""
    angles = (position_ids.to(torch.float32) / scaling).unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def packed_attention_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, S, S] of packed rows: a token sees the tokens of its own sample (segment id > 0)
    at positions up to its own, wherever they sit in the row. Padding (segment 0) sees only itself, so no row
    of the mask is empty (NaN in SDPA); no real token sees padding."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    causal = position_ids[:, None, :] <= position_ids[:, :, None]
    eye = torch.eye(segment_ids.shape[1], dtype=torch.bool, device=segment_ids.device)
    return ((same & causal) | eye).unsqueeze(1)


def packed_flex_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor):
    """The same mask as a FlexAttention BlockMask (skips the blocks where no sample meets itself)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        seg_q, seg_k = segment_ids[b, q], segment_ids[b, k]
        return ((seg_q == seg_k) & (seg_k > 0) & (position_ids[b, k] <= position_ids[b, q])) | (q == k)

    b, s = segment_ids.shape
    return create_block_mask(mask_mod, b, None, s, s, device=segment_ids.device)


class PackedSegments:
    """Packed rows regrouped per sample for attention (GPU/CPU: data-dependent shapes). Each sample's tokens, in
    position order, are one causal sequence: on CUDA with torch >= 2.10 they go to PyTorch's variable-length
    flash attention (torch.nn.attention.varlen) as they are; elsewhere the samples are bucketed by length
    (multiples of BUCKET tokens) and each bucket runs as one [n, length] batch through SDPA's fused causal
    kernels. The outputs go back to their row positions. The same result as the block-diagonal mask, at about
    the cost of the samples' own lengths instead of the whole row's. Padding tokens (segment 0) get zeros."""

    BUCKET = 64

    def __init__(self, segment_ids: torch.Tensor, position_ids: torch.Tensor, varlen=None):
        b, s = segment_ids.shape
        seg, pos = segment_ids.long(), position_ids.long()
        device = seg.device
        sample = torch.arange(b, device=device).unsqueeze(1) * (s + 1) + seg  # a number per (row, segment)
        key = torch.where(seg > 0, sample * s + pos, torch.full_like(pos, (b + 1) * (s + 1) * s))
        real = int((seg > 0).sum())
        order = key.flatten().argsort()[:real]  # flat token indices, grouped by sample, in position order
        counts = torch.unique_consecutive(sample.flatten()[order], return_counts=True)[1]
        starts = torch.cumsum(counts, 0) - counts
        sample_of = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        rank = torch.arange(real, device=device) - torch.repeat_interleave(starts, counts)
        self.shape = (b, s)
        self.order = order
        self.varlen = varlen  # varlen_attention(q, k, v, cu_seqlens, longest) or None
        self.cu_seqlens = F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
        self.longest = int(counts.max()) if real else 0
        length = (counts + self.BUCKET - 1) // self.BUCKET * self.BUCKET
        self.buckets = []  # (flat token indices, row in the bucket batch, position in it, rows, length)
        for size in sorted(set(length.tolist())):
            members = (length == size).nonzero().squeeze(-1)
            local = torch.full((len(counts),), -1, dtype=torch.long, device=device)
            local[members] = torch.arange(len(members), device=device)
            tokens = (local[sample_of] >= 0).nonzero().squeeze(-1)
            self.buckets.append((order[tokens], local[sample_of[tokens]], rank[tokens], len(members), size))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        b, s = self.shape
        heads, dim = q.shape[1], q.shape[3]
        flat = [x.transpose(1, 2).reshape(b * s, heads, dim) for x in (q, k, v)]
        out = q.new_zeros(b * s, heads, dim)
        if self.varlen is not None and dropout_p == 0 and q.dtype in (torch.float16, torch.bfloat16):  # flash
            res = self.varlen(*(x[self.order] for x in flat), self.cu_seqlens, self.longest)
            return out.index_put((self.order,), res).reshape(b, s, heads, dim).transpose(1, 2)
        for index, row, col, rows, size in self.buckets:
            batch = []
            for x in flat:  # [b*s, h, D] -> [rows, h, size, D]
                dense = x.new_zeros(rows, size, heads, dim)
                dense[row, col] = x[index]
                batch.append(dense.transpose(1, 2))
            res = F.scaled_dot_product_attention(*batch, is_causal=True, dropout_p=dropout_p)
            out = out.index_put((index,), res.transpose(1, 2)[row, col])
        return out.reshape(b, s, heads, dim).transpose(1, 2)


_COMPILED_FLEX = []


def flex_attention(q, k, v, block_mask):
    """torch.compile'd FlexAttention (compiled once per process; eager FlexAttention is a slow reference)."""
    if not _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _COMPILED_FLEX.append(torch.compile(flex, dynamic=False) if q.is_cuda else flex)
    return _COMPILED_FLEX[0](q, k, v, block_mask=block_mask)


def varlen_attention(device: torch.device):
    """PyTorch's variable-length flash attention as f(q, k, v, cu_seqlens, longest) -> [T, h, D], causal; None
    where it is missing (CPU, torch < 2.10). Its causal switch is `is_causal` in 2.10 and window_size (-1, 0)
    (no keys to the right) later."""
    if device.type != "cuda" or tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 10):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect

    causal = {"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters else {
        "window_size": (-1, 0)}

    def attend(q, k, v, cu_seqlens, longest):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, **causal)

    return attend


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of the first 2*cos.shape[-1] channels of x [B, heads, S, D].

    cos/sin are [S, rotary_dim/2] (one table for every row) or [B, 1, S, rotary_dim/2] (per-token positions)."""
    rotary_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = x_rot.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row (a decoding step): q [B, H, 1, D] over the cached k, v [B, KV, L, D],
    blocked [B, 1, 1, L] (bool, True = not attended; one for all layers of a step). The H query heads are grouped per
    kv head as [B, KV, H/KV, D], so the cache is read in place: repeating it per group (as the prompt pass does)
    would copy all of it at every step, which took more time than the matmuls. Softmax in fp32, as
    scaled_dot_product_attention does. Returns [B, H, D]."""
    b, heads, _, d = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.reshape(b, kv, heads // kv, d), k.transpose(-1, -2)) * d ** -0.5
    weights = scores.float().masked_fill(blocked, float("-inf")).softmax(-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(b, heads, d)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention through torch's scaled_dot_product_attention.

    inner_dim: width of q (num_heads x head_dim; default hidden_size, Qwen3 sets it apart). qk_norm_eps: a
    per-head RMSNorm on q and k before the rotation (Qwen3), named q_norm / k_norm as in ModelZoo."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 qkv_bias: bool = False, output_bias: bool = False, dropout_rate: float = 0.0,
                 inner_dim: Optional[int] = None, qk_norm_eps: Optional[float] = None):
        super().__init__()
        inner_dim = inner_dim or hidden_size
        if inner_dim % num_heads:
            raise ValueError(f"attention width {inner_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of the kv heads {self.num_kv_heads}")
        self.head_dim = inner_dim // num_heads
        kv_size = self.num_kv_heads * self.head_dim
        self.proj_q_dense_layer = nn.Linear(hidden_size, inner_dim, bias=qkv_bias)
        self.proj_k_dense_layer = nn.Linear(hidden_size, kv_size, bias=qkv_bias)
        self.proj_v_dense_layer = nn.Linear(hidden_size, kv_size, bias=qkv_bias)
        self.proj_output_dense_layer = nn.Linear(inner_dim, hidden_size, bias=output_bias)
        self.q_norm = RMSNorm(self.head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(self.head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.dropout_rate = dropout_rate

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                rotary: Optional[tuple] = None, cache: Optional["KVCache"] = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.proj_q_dense_layer(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.proj_k_dense_layer(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.proj_v_dense_layer(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:  # fp32 tables: cast back so q, k, v share a dtype (half outputs on CSX)
            q = apply_interleaved_rotary(q, *rotary).to(v.dtype)
            k = apply_interleaved_rotary(k, *rotary).to(v.dtype)
        if cache is not None:  # generation: attend to every earlier token's keys too
            k, v = cache.append(k, v)
            if s == 1:
                return self.proj_output_dense_layer(one_query_attention(q, k, v, ~attn_mask).reshape(b, 1, -1))
        if self.num_kv_heads != self.num_heads:  # torch 2.4 has no enable_gqa flag
            groups = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if isinstance(attn_mask, PackedSegments):
            out = attn_mask.attend(q, k, v, self.dropout_rate if self.training else 0.0)
        elif attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a BlockMask: FlexAttention
            out = flex_attention(q, k, v, attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 dropout_p=self.dropout_rate if self.training else 0.0)
        return self.proj_output_dense_layer(out.transpose(1, 2).reshape(b, s, -1))


# ----------------------------------------------------------------------------------------------
# Image model (CLIP ViT)


class ViTEmbeddings(nn.Module):
    """Conv patchify + CLS (CLIP; SigLIP has none) + learned positions (CLS row stored last) + post-embedding
    LayerNorm (CLIP's pre_layrnorm; SigLIP has none)."""

    def __init__(self, hidden_size: int, image_size: Sequence[int], patch_size: Sequence[int], num_channels: int,
                 use_embed_proj_bias: bool, use_post_embed_layer_norm: bool, layer_norm_epsilon: float,
                 dropout_rate: float = 0.0, prepend_cls_token: bool = True):
        super().__init__()
        grid = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
        self.num_patches = grid[0] * grid[1]
        self.linear_proj = nn.Conv2d(num_channels, hidden_size, kernel_size=tuple(patch_size),
                                     stride=tuple(patch_size), bias=use_embed_proj_bias)
        self.cls_embedding = nn.Parameter(torch.zeros(hidden_size)) if prepend_cls_token else None
        self.position_embeddings = nn.Embedding(self.num_patches + prepend_cls_token, hidden_size)
        self.dropout = nn.Dropout(dropout_rate)
        self.post_embed_ln = nn.LayerNorm(hidden_size, eps=layer_norm_epsilon) if use_post_embed_layer_norm else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.linear_proj(pixels).flatten(2).transpose(1, 2)  # [B, NP, D], row-major grid
        pos = self.position_embeddings.weight
        x = patches + pos[: self.num_patches]
        if self.cls_embedding is not None:
            cls = (self.cls_embedding + pos[self.num_patches]).expand(patches.shape[0], 1, -1)
            x = torch.cat((cls.to(patches.dtype), x), dim=1)
        x = self.dropout(x)
        return self.post_embed_ln(x) if self.post_embed_ln is not None else x


class ViTEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(self, hidden_size: int, num_heads: int, filter_size: int, nonlinearity: str, layer_norm_epsilon: float,
                 qkv_bias: bool, output_bias: bool, ffn_bias: bool, dropout_rate: float, attention_dropout_rate: float):
        super().__init__()
        self.self_attn = Attention(hidden_size, num_heads, None, qkv_bias, output_bias, attention_dropout_rate)
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_epsilon)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_epsilon)
        self.ffn = FeedForwardNetwork(hidden_size, [filter_size, hidden_size], [nonlinearity, None], ffn_bias)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm1(x)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class TransformerStack(nn.Module):
    """`layers` + final `norm`, the container Cerebras calls transformer_encoder / transformer_decoder."""

    def __init__(self, layers: list, norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.activation_checkpointing = False

    def run_layers(self, x: torch.Tensor, count: int, **kwargs) -> torch.Tensor:
        for layer in self.layers[:count]:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False, **kwargs)
            else:
                x = layer(x, **kwargs)
        return x


class ViTEncoder(nn.Module):
    def __init__(self, layers: list, norm: nn.Module):
        super().__init__()
        self.transformer_encoder = TransformerStack(layers, norm)


class ViTModel(nn.Module):
    """CLIP or SigLIP vision transformer. `extract_features(pixels, k)` returns the hidden states after layer k.

    SigLIP: prepend_cls_token False, use_embed_proj_bias True, use_post_embed_layer_norm False, nonlinearity
    gelu_pytorch_tanh (its attention-pooling head is not part of it: LLaVA reads the patch features)."""

    def __init__(self, hidden_size: int = 1024, num_hidden_layers: int = 24, num_heads: int = 16,
                 filter_size: int = 4096, image_size: Sequence[int] = (336, 336), patch_size: Sequence[int] = (14, 14),
                 num_channels: int = 3, nonlinearity: str = "quick_gelu", layer_norm_epsilon: float = 1e-5,
                 use_embed_proj_bias: bool = False, use_post_embed_layer_norm: bool = True,
                 use_projection_bias_in_attention: bool = True, use_ffn_bias_in_attention: bool = True,
                 use_ffn_bias: bool = True, embedding_dropout_rate: float = 0.0, dropout_rate: float = 0.0,
                 attention_dropout_rate: float = 0.0, prepend_cls_token: bool = True):
        super().__init__()
        self.embedding_layer = ViTEmbeddings(hidden_size, image_size, patch_size, num_channels, use_embed_proj_bias,
                                             use_post_embed_layer_norm, layer_norm_epsilon, embedding_dropout_rate,
                                             prepend_cls_token)
        layers = [
            ViTEncoderLayer(hidden_size, num_heads, filter_size, nonlinearity, layer_norm_epsilon,
                            use_projection_bias_in_attention, use_ffn_bias_in_attention, use_ffn_bias,
                            dropout_rate, attention_dropout_rate)
            for _ in range(num_hidden_layers)
        ]
        self.encoder = ViTEncoder(layers, nn.LayerNorm(hidden_size, eps=layer_norm_epsilon))

    @property
    def num_patches(self) -> int:
        return self.embedding_layer.num_patches

    @property
    def has_cls(self) -> bool:
        return self.embedding_layer.cls_embedding is not None

    def extract_features(self, pixels: torch.Tensor, layer_idx: Optional[int] = None) -> torch.Tensor:
        """Hidden states [B, 1+NP, D] (SigLIP: [B, NP, D]) after encoder layer `layer_idx` (0-based, >= 0).

        With layer_idx None all layers run and the final norm is applied to every token; with an index the
        final norm is skipped (LLaVA selects the penultimate layer's raw output)."""
        stack = self.encoder.transformer_encoder
        x = self.embedding_layer(pixels)
        if layer_idx is None:
            return stack.norm(stack.run_layers(x, len(stack.layers)))
        return stack.run_layers(x, layer_idx + 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.extract_features(pixels, None)


# ----------------------------------------------------------------------------------------------
# Text model (Llama decoder with LM head)


class LlamaDecoderLayer(nn.Module):
    """x + attn(norm1(x)), then x + swiglu_ffn(norm3(x)); Cerebras names the second norm `norm3`."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int], filter_size: int,
                 nonlinearity: str, layer_norm_epsilon: float, qkv_bias: bool, output_bias: bool, ffn_bias: bool,
                 dropout_rate: float, attention_dropout_rate: float, inner_dim: Optional[int] = None,
                 qk_norm_eps: Optional[float] = None):
        super().__init__()
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, qkv_bias, output_bias,
                                   attention_dropout_rate, inner_dim, qk_norm_eps)
        self.norm1 = RMSNorm(hidden_size, layer_norm_epsilon)
        self.norm3 = RMSNorm(hidden_size, layer_norm_epsilon)
        self.ffn = FeedForwardNetwork(hidden_size, [filter_size, hidden_size], [nonlinearity, None], ffn_bias)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                rotary: Optional[tuple] = None, cache: Optional["KVCache"] = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, rotary=rotary,
                                            cache=cache))
        return x + self.dropout(self.ffn(self.norm3(x)))


class TextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)


class LlamaLMModel(nn.Module):
    """Llama-family decoder + LM head (Llama-2/3, Mistral, Qwen2/2.5, Qwen3), named as Cerebras' GPT2LMHeadModel
    configured Llama-style.

    use_projection_bias_in_attention: q/k/v biases (Qwen2); use_ffn_bias_in_attention: the output projection's
    bias (ModelZoo's names). llama3_scaling: Llama-3.1 RoPE frequency scaling (rope_inverse_frequencies)."""

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 4096, num_hidden_layers: int = 32,
                 num_heads: int = 32, num_kv_heads: Optional[int] = None, filter_size: int = 11008,
                 nonlinearity: str = "swiglu", layer_norm_epsilon: float = 1e-5, rotary_dim: Optional[int] = None,
                 rope_theta: float = 10000.0, pos_scaling_factor: float = 1.0, share_embedding_weights: bool = False,
                 use_projection_bias_in_attention: bool = False, use_ffn_bias: bool = False,
                 use_bias_in_output: bool = False, embd_pdrop: float = 0.0, dropout_rate: float = 0.0,
                 attention_dropout_rate: float = 0.0, use_ffn_bias_in_attention: Optional[bool] = None,
                 attention_inner_dim: Optional[int] = None, qk_norm_eps: Optional[float] = None,
                 llama3_scaling: Optional[dict] = None):
        super().__init__()
        self.embedding_layer = TextEmbeddings(vocab_size, hidden_size)
        self.embedding_dropout = nn.Dropout(embd_pdrop)
        output_bias = use_projection_bias_in_attention if use_ffn_bias_in_attention is None \
            else use_ffn_bias_in_attention
        layers = [
            LlamaDecoderLayer(hidden_size, num_heads, num_kv_heads, filter_size, nonlinearity, layer_norm_epsilon,
                              use_projection_bias_in_attention, output_bias, use_ffn_bias, dropout_rate,
                              attention_dropout_rate, attention_inner_dim, qk_norm_eps)
            for _ in range(num_hidden_layers)
        ]
        self.transformer_decoder = TransformerStack(layers, RMSNorm(hidden_size, layer_norm_epsilon))
        # Cerebras registers the final norm twice, so checkpoints carry both `transformer_decoder.norm` and `ln_f`.
        self.ln_f = self.transformer_decoder.norm
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=use_bias_in_output)
        if share_embedding_weights:
            self.lm_head.weight = self.embedding_layer.word_embeddings.weight
        self.rotary_dim = rotary_dim or (attention_inner_dim or hidden_size) // num_heads
        self.rope_theta = rope_theta
        self.pos_scaling_factor = pos_scaling_factor  # linear position scaling (positions divided by it)
        self.llama3_scaling = dict(llama3_scaling) if llama3_scaling else None
        # Packed rows: "auto" = per-sample attention (PackedSegments: varlen flash attention on CUDA, bucketed
        # SDPA elsewhere) when shapes may depend on the data (GPU/CPU), else SDPA with a dense mask (fixed
        # shapes, CSX); "segments" / "sdpa" / "flex" (FlexAttention on the dense mask's blocks) force one.
        self.packed_attention = "auto"

    def inverse_frequencies(self, device) -> torch.Tensor:
        return rope_inverse_frequencies(self.rotary_dim, self.rope_theta, self.llama3_scaling, device)

    def compute_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding_layer.word_embeddings(input_ids)

    def decode(self, embeddings: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
               position_ids: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
               dynamic: bool = False) -> torch.Tensor:
        """Causal decoder over input embeddings [B, S, H]; returns final-norm hidden states.

        key_padding_mask: [B, S], nonzero = that key position is never attended to.
        position_ids + segment_ids [B, S] (packed rows): each token's position in its own sample and the
        sample's number in the row (0 = padding); attention stays inside a sample and causal in position.
        dynamic: shapes may depend on the data (GPU/CPU), which allows the per-sample attention."""
        b, s, _ = embeddings.shape
        if segment_ids is not None:
            return self._decode_packed(embeddings, position_ids, segment_ids, dynamic)
        rotary = rotary_tables(s, self.inverse_frequencies(embeddings.device), self.pos_scaling_factor,
                               torch.float32)
        if key_padding_mask is None:
            attn_mask, is_causal = None, True
        else:
            causal = torch.ones(s, s, dtype=torch.bool, device=embeddings.device).tril()
            attend = causal & (key_padding_mask == 0)[:, None, None, :]
            # A query may always see itself, so a masked position never has an all-masked row (NaN in SDPA);
            # no real position attends to a masked key, so this changes no unmasked output.
            attn_mask = attend | torch.eye(s, dtype=torch.bool, device=embeddings.device)
            is_causal = False
        x = self.embedding_dropout(embeddings)
        stack = self.transformer_decoder
        x = stack.run_layers(x, len(stack.layers), attn_mask=attn_mask, is_causal=is_causal, rotary=rotary)
        return self.ln_f(x)

    def _decode_packed(self, embeddings: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor,
                       dynamic: bool) -> torch.Tensor:
        rotary = rotary_for_positions(position_ids, self.inverse_frequencies(embeddings.device),
                                      self.pos_scaling_factor)
        impl = self.packed_attention
        if impl == "auto":
            impl = "segments" if dynamic else "sdpa"
        if impl == "flex":
            attn_mask = packed_flex_mask(segment_ids, position_ids)
        elif impl == "segments":
            attn_mask = PackedSegments(segment_ids, position_ids, varlen_attention(embeddings.device))
        else:
            attn_mask = packed_attention_mask(segment_ids, position_ids)
        x = self.embedding_dropout(embeddings)
        stack = self.transformer_decoder
        x = stack.run_layers(x, len(stack.layers), attn_mask=attn_mask, is_causal=False, rotary=rotary)
        return self.ln_f(x)

    def new_caches(self, batch: int, max_len: int, dtype, device) -> list["KVCache"]:
        attn = self.transformer_decoder.layers[0].self_attn
        return [KVCache(batch, attn.num_kv_heads, max_len, attn.head_dim, dtype, device)
                for _ in self.transformer_decoder.layers]

    def decode_cached(self, embeddings: torch.Tensor, position_ids: torch.Tensor, attend: torch.Tensor,
                      caches: list["KVCache"]) -> torch.Tensor:
        """Decoder over new tokens [B, S, H] at positions [B, S], appending their keys/values to `caches`;
        attend [B, 1, S, L] (bool, True = attend) covers the L = cached + new keys. Final-norm hidden states."""
        rotary = rotary_for_positions(position_ids, self.inverse_frequencies(embeddings.device),
                                      self.pos_scaling_factor)
        x = embeddings
        for layer, cache in zip(self.transformer_decoder.layers, caches):
            x = layer(x, attn_mask=attend, rotary=rotary, cache=cache)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        embeddings = self.compute_input_embeddings(input_ids)
        return self.lm_head(self.decode(embeddings, key_padding_mask, position_ids, segment_ids))


class KVCache:
    """Static-size key/value cache of one decoder layer, [B, kv_heads, max_len, head_dim], filled left to right:
    allocated once per generate() call, so decoding never re-encodes the prompt nor reallocates."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.keys = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"generation needs {end} positions but the cache holds {self.keys.shape[2]}")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


# ----------------------------------------------------------------------------------------------
# Decoding steps: one new token per row, after the prompt pass
#
# A step reads every weight of the decoder for a handful of rows, so its time is the weights' memory traffic plus
# the per-op overhead of the layer code. The step path below runs the layers with as few ops as they allow. On CPU
# in fp32 it also multiplies through a copy of the weights laid out for the step's few rows, because MKL's gemm
# on nn.Linear's [out, in] weights (F.linear) reads them far below memory bandwidth there; benchmarks/generate.py
# measures the whole. The copy is made only where it fits easily in free memory, and kept per text model until its
# weights change.
#
# Weight layouts of a step (STEP_LAYOUTS):
#   "modules"    the nn.Linears themselves: no copy (GPUs, half precision, little free memory)
#   "transposed" [in, out] contiguous, x @ W: MKL's gemv, near memory bandwidth for one row (2.4x F.linear on
#                the LM head); q/k/v and gate/up concatenated into one matmul each
#   "onednn"     reordered into oneDNN's blocked layout: 1.5-1.9x F.linear for 4 to 32 rows, where the
#                transposed layout is no faster than F.linear; concatenated as above
STEP_LAYOUTS = ("modules", "transposed", "onednn")

# The batch size oneDNN lays reordered weights out for. Any batch runs on them; a layout for 1 row made 8 rows
# 1.7x slower, while one for 32 rows ran 1 to 32 rows as fast as the layout made for each.
REORDER_ROWS_HINT = 32


def free_memory_bytes() -> int:
    """Physical memory not in use, as the OS reports it (0 where it does not)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 0


def step_layout(weights: Sequence[torch.Tensor], rows: int) -> str:
    """The STEP_LAYOUTS entry for decoding `rows` rows with these weights: a copy only for fp32 on CPU, and only
    where it takes at most half of the free memory."""
    first = weights[0]
    if first.device.type != "cpu" or first.dtype != torch.float32:
        return "modules"
    if 2 * sum(w.numel() * w.element_size() for w in weights) > free_memory_bytes():
        return "modules"
    if rows == 1:
        return "transposed"
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "onednn"
    return "modules"


class StepLinear:
    """The nn.Linears that read the same input in a step, applied to x [B, in]; returns their outputs in order,
    through the weights in `layout` (STEP_LAYOUTS)."""

    def __init__(self, linears: Sequence[nn.Linear], layout: str):
        self.linears = list(linears)
        self.sizes = [linear.out_features for linear in linears]
        self.layout = layout
        self.weight = self.bias = None
        if layout == "modules":
            return
        weight = torch.cat([linear.weight for linear in linears])
        if layout == "transposed":
            self.weight = weight.t().contiguous()
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, REORDER_ROWS_HINT)
        if linears[0].bias is not None:
            self.bias = torch.cat([linear.bias for linear in linears])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.layout == "modules":
            return [linear(x) for linear in self.linears]
        if self.layout == "transposed":
            out = x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return list(out.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [out]


def step_rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, head_dim: int):
    """cos and signed-sin tables [B, 1, 1, head_dim] for one token per row at positions [B], such that
    apply_step_rotary(x) equals apply_interleaved_rotary(x) bit for bit: pair (e, o) becomes
    (e*cos + o*(-sin), o*cos + e*sin), and the channels past the rotary ones get cos 1, sin 0."""
    cos, sin = rotary_for_positions(positions[:, None], inv_freq, scaling)
    cos_full = torch.ones(*cos.shape[:-1], head_dim, dtype=cos.dtype, device=cos.device)
    sin_full = torch.zeros_like(cos_full)
    rotary_dim = 2 * cos.shape[-1]
    cos_full[..., :rotary_dim] = cos.repeat_interleave(2, dim=-1)
    sin_full[..., :rotary_dim] = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return cos_full, sin_full


def apply_step_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The interleaved rotation of x [B, heads, 1, D] in four ops: x*cos + swap_pairs(x)*signed_sin."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos + swapped * signed_sin


class DecoderLayerStep:
    """LlamaDecoderLayer.forward for one new token per row (x [B, hidden]), in eval mode (no dropout)."""

    def __init__(self, layer: "LlamaDecoderLayer", layout: str):
        attn = layer.self_attn
        up, down = layer.ffn.ffn
        self.norm1, self.norm3 = layer.norm1, layer.norm3
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.qkv = StepLinear([attn.proj_q_dense_layer, attn.proj_k_dense_layer, attn.proj_v_dense_layer], layout)
        self.out = StepLinear([attn.proj_output_dense_layer], layout)
        self.activation = up.activation
        gated = [up.linear_layer, up.linear_layer_for_glu] if up.activation in GLU_ACTIVATIONS else [up.linear_layer]
        self.up = StepLinear(gated, layout)
        self.down = StepLinear([down.linear_layer], layout)

    def __call__(self, x: torch.Tensor, rotary: tuple, blocked: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """rotary: step_rotary_tables; blocked [B, 1, 1, L] (bool): keys the new tokens do not attend to."""
        b = x.shape[0]
        q, k, v = self.qkv(self.norm1(x))
        q = q.view(b, self.heads, 1, self.head_dim)
        k = k.view(b, self.kv_heads, 1, self.head_dim)
        v = v.view(b, self.kv_heads, 1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_step_rotary(q, *rotary).to(v.dtype)
        k = apply_step_rotary(k, *rotary).to(v.dtype)
        keys, values = cache.append(k, v)
        x = x + self.out(one_query_attention(q, keys, values, blocked).reshape(b, -1))[0]
        hidden = self.up(self.norm3(x))
        if self.activation in GLU_ACTIVATIONS:
            hidden = hidden[0] * GLU_ACTIVATIONS[self.activation](hidden[1])
        else:
            hidden = ACTIVATIONS[self.activation](hidden[0])
        return x + self.down(hidden)[0]


class DecodingSteps:
    """A LlamaLMModel prepared for decoding steps: tokens [B] at positions [B] -> logits [B, V] of the next ones,
    its linear layers' weights in `layout` (STEP_LAYOUTS)."""

    def __init__(self, text_model: "LlamaLMModel", layout: str):
        self.layout = layout
        self.embeddings = text_model.embedding_layer.word_embeddings
        self.layers = [DecoderLayerStep(layer, layout) for layer in text_model.transformer_decoder.layers]
        self.head_dim = self.layers[0].head_dim
        self.final_norm = text_model.ln_f
        self.lm_head = StepLinear([text_model.lm_head], layout)
        self.inv_freq = text_model.inverse_frequencies(self.embeddings.weight.device)
        self.scaling = text_model.pos_scaling_factor

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[0]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, attend: torch.Tensor,
                 caches: list[KVCache]) -> torch.Tensor:
        """attend [B, 1, 1, L] (bool) covers the L = cached + new keys; returns the next tokens' logits."""
        x = self.embeddings(tokens)
        rotary = step_rotary_tables(positions, self.inv_freq, self.scaling, self.head_dim)
        blocked = ~attend
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rotary, blocked, cache)
        return self.logits(self.final_norm(x))


# Decoding weights copied into a step layout, per text model, dropped with it: (layout, weights' state, steps).
_COPIED_STEPS: "weakref.WeakKeyDictionary[LlamaLMModel, tuple]" = weakref.WeakKeyDictionary()


def decoding_steps(text_model: "LlamaLMModel", rows: int) -> DecodingSteps:
    """The text model's DecodingSteps for `rows` rows, in step_layout's layout. A copied layout is kept and reused
    while the layout and the weights stay the same (same storage, no in-place change), so one copy is held."""
    layers = text_model.transformer_decoder.layers
    weights = [p for p in layers.parameters() if p.dim() == 2] + [text_model.lm_head.weight]
    layout = step_layout(weights, rows)
    if layout == "modules":
        return DecodingSteps(text_model, layout)
    state = tuple((w.data_ptr(), w._version) for w in weights)
    kept = _COPIED_STEPS.get(text_model)
    if kept is not None and kept[:2] == (layout, state):
        return kept[2]
    _COPIED_STEPS.pop(text_model, None)  # free the old copy before making the new one
    try:
        steps = DecodingSteps(text_model, layout)
    except RuntimeError:  # oneDNN without a kernel for this CPU: kept too, so the next call does not try again
        steps = DecodingSteps(text_model, "modules")
    _COPIED_STEPS[text_model] = (layout, state, steps)
    return steps


def next_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of logits [B, V]: argmax at temperature 0, else a sample from the temperature-scaled
    distribution restricted to the top_k tokens (0 = all) and to the smallest set holding top_p of the mass."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs > top_p  # tokens after the mass already reached top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(beyond, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def matched_stop(tokens: list[int], stop_sequences: Sequence[Sequence[int]]) -> int:
    """Length of the stop sequence `tokens` ends with (0 = none)."""
    for seq in stop_sequences:
        if len(seq) and tokens[-len(seq):] == list(seq):
            return len(seq)
    return 0


def cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the earliest of the stop strings it holds (all of it when it holds none)."""
    ends = [text.find(stop) for stop in stop_strings if stop and stop in text]
    return text[:min(ends)] if ends else text


class StopRules:
    """When a row's answer ends, checked after each new token: an EOS / end-of-turn token (not kept), a token
    sequence it ends with (cut off), or a string its decoded text holds (stop_strings, with decode = ids -> text).
    A stop string can end inside a token, so that row keeps its tokens up to the one completing the string and
    the caller cuts the text with cut_at_stop_string, as the LLaVA repo's and transformers' stop strings do."""

    def __init__(self, eos_token_ids: Sequence[int] = (), stop_sequences: Sequence[Sequence[int]] = (),
                 stop_strings: Sequence[str] = (), decode: Optional[Callable[[list[int]], str]] = None):
        if stop_strings and decode is None:
            raise ValueError("stop_strings need decode (token ids -> text), e.g. the tokenizer's decode")
        self.eos = set(eos_token_ids)
        self.stop_sequences = [list(seq) for seq in stop_sequences if len(seq)]
        self.stop_strings = [stop for stop in stop_strings if stop]
        self.decode = decode

    def add(self, tokens: list[int], token: int) -> bool:
        """Append `token` to a row's `tokens` unless it is an EOS; True when the row's answer has ended."""
        if token in self.eos:
            return True
        tokens.append(token)
        cut = matched_stop(tokens, self.stop_sequences)
        if cut:
            del tokens[-cut:]
            return True
        if self.stop_strings:  # the whole answer so far: a token's text can depend on the one before it
            text = self.decode(tokens)
            return any(stop in text for stop in self.stop_strings)
        return False


# ----------------------------------------------------------------------------------------------
# LLaVA


class Llava(nn.Module):
    """ViT features -> projector -> written over the image placeholder slots of the text embeddings -> Llama."""

    def __init__(self, image_model: ViTModel, text_model: LlamaLMModel, projector_image_model: nn.Module,
                 image_feature_select_layer_idx: Optional[int] = None, image_feature_select_mode: str = "patch",
                 image_start_idx: int = 1):
        super().__init__()
        if image_feature_select_mode not in ("patch", "cls_patch"):
            raise ValueError(f"image_feature_select_mode must be 'patch' or 'cls_patch', got "
                             f"{image_feature_select_mode!r}")
        self.image_model = image_model
        self.text_model = text_model
        self.projector_image_model = projector_image_model
        num_layers = len(image_model.encoder.transformer_encoder.layers)
        # Negative indices count from the end (-2 = penultimate layer = LLaVA's mm_vision_select_layer -2).
        self.image_feature_select_layer_idx = (
            None if image_feature_select_layer_idx is None else image_feature_select_layer_idx % num_layers)
        self.image_feature_select_mode = image_feature_select_mode
        self.image_start_idx = image_start_idx

    @property
    def num_image_tokens(self) -> int:
        cls = self.image_feature_select_mode == "cls_patch" and self.image_model.has_cls
        return self.image_model.num_patches + cls

    def image_features(self, image_data: torch.Tensor) -> torch.Tensor:
        """Projected image features [B, NP, H_text] (NP + 1 in cls_patch mode)."""
        weight = self.image_model.embedding_layer.linear_proj.weight
        feats = self.image_model.extract_features(image_data.to(weight.dtype), self.image_feature_select_layer_idx)
        if self.image_feature_select_mode == "patch" and self.image_model.has_cls:
            feats = feats[:, 1:]  # a tower without CLS (SigLIP) has nothing to drop
        return self.projector_image_model(feats)

    def merge(self, text_embeddings: torch.Tensor, image_features: torch.Tensor,
              image_start_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace NP placeholder embeddings, at the static start index or per sample, with image features."""
        image_features = image_features.to(text_embeddings.dtype)
        n = image_features.shape[1]
        if image_start_idx is None:
            s = self.image_start_idx
            return torch.cat((text_embeddings[:, :s], image_features, text_embeddings[:, s + n:]), dim=1)
        positions = image_start_idx.long().view(-1, 1) + torch.arange(n, device=text_embeddings.device)
        index = positions.unsqueeze(-1).expand(-1, -1, text_embeddings.shape[-1])
        return text_embeddings.scatter(1, index, image_features)

    def packed_image_features(self, image_data: torch.Tensor, image_valid: torch.Tensor,
                              skip_unused: bool) -> torch.Tensor:
        """Features [B, K * NP, H_text] of the K image slots of packed rows (image_data [B, K, C, H, W]).

        skip_unused (GPU/CPU) runs the ViT only on the slots that hold an image; fixed-shape backends run all
        K (the unused ones are zero images whose features the merge discards)."""
        b, k = image_valid.shape
        flat = image_data.flatten(0, 1)
        if not skip_unused:
            return self.image_features(flat).reshape(b, k * self.num_image_tokens, -1)
        used = image_valid.reshape(-1).bool()
        hidden = self.text_model.embedding_layer.word_embeddings.embedding_dim
        feats = flat.new_zeros(b * k, self.num_image_tokens, hidden)
        if bool(used.any()):
            chosen = self.image_features(flat[used])
            feats = feats.to(chosen.dtype).index_put((used.nonzero().squeeze(-1),), chosen)
        return feats.reshape(b, k * self.num_image_tokens, -1)

    def merge_packed(self, text_embeddings: torch.Tensor, image_features: torch.Tensor,
                     image_valid: torch.Tensor) -> torch.Tensor:
        """Packed rows hold image k's NP tokens at row positions [k * NP, (k + 1) * NP) when slot k is used;
        an unused slot's positions hold text. A static slice and a select: no data-dependent shapes."""
        n = image_features.shape[1]
        used = image_valid.bool().repeat_interleave(self.num_image_tokens, dim=1).unsqueeze(-1)
        head = torch.where(used, image_features.to(text_embeddings.dtype), text_embeddings[:, :n])
        return torch.cat((head, text_embeddings[:, n:]), dim=1)

    def hidden_states(self, image_data: torch.Tensor, text_input_ids: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor] = None,
                      image_start_idx: Optional[torch.Tensor] = None, packed: Optional[dict] = None
                      ) -> torch.Tensor:
        text = self.text_model.compute_input_embeddings(text_input_ids)
        if packed is not None:
            feats = self.packed_image_features(image_data, packed["image_valid"], packed.get("dynamic", False))
            merged = self.merge_packed(text, feats, packed["image_valid"])
            return self.text_model.decode(merged, None, packed["position_ids"], packed["segment_ids"],
                                          packed.get("dynamic", False))
        merged = self.merge(text, self.image_features(image_data), image_start_idx)
        return self.text_model.decode(merged, key_padding_mask)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_data: Optional[torch.Tensor] = None, image_start_idx: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 64, eos_token_ids: Sequence[int] = (), temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                 stop_sequences: Sequence[Sequence[int]] = (), stop_strings: Sequence[str] = (),
                 decode: Optional[Callable[[list[int]], str]] = None) -> list[list[int]]:
        """Answer a batch of prompts; returns each row's new tokens, without the EOS / stop sequence that ended it
        (a stop string: see StopRules).

        input_ids [B, S]: prompts padded on the left (attention_mask [B, S], 1 = attended token), each holding the NP
        image slots at image_start_idx [B] when image_data [B, C, H, W] is given. The image features are computed
        once; the prompt is encoded once into static-size key/value caches, then one token per step (DecodingSteps)."""
        b, s = input_ids.shape
        real = attention_mask.bool()
        embeds = self.text_model.compute_input_embeddings(input_ids)
        if image_data is not None:
            embeds = self.merge(embeds, self.image_features(image_data), image_start_idx)
        caches = self.text_model.new_caches(b, s + max_new_tokens, embeds.dtype, embeds.device)
        keys = torch.zeros(b, s + max_new_tokens, dtype=torch.bool, device=embeds.device)
        keys[:, :s] = real
        causal = torch.ones(s, s, dtype=torch.bool, device=embeds.device).tril()
        eye = torch.eye(s, dtype=torch.bool, device=embeds.device)  # a pad query sees itself: no all-masked row
        attend = (causal & real[:, None, None, :]) | eye
        # positions count from each row's first real token; masked slots after it (a text-only row's image
        # slots, as in training) still take their positions
        positions = (torch.arange(s, device=embeds.device) - real.long().argmax(1, keepdim=True)).clamp(min=0)
        steps = decoding_steps(self.text_model, b)
        logits = steps.logits(self.text_model.decode_cached(embeds, positions, attend, caches)[:, -1])
        position = positions[:, -1] + 1
        rules = StopRules(eos_token_ids, stop_sequences, stop_strings, decode)
        history: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max_new_tokens):
            token = next_tokens(logits, temperature, top_k, top_p, generator)
            for row, t in enumerate(token.tolist()):
                if not done[row]:
                    done[row] = rules.add(history[row], t)
            if all(done) or step == max_new_tokens - 1:
                break
            keys[:, s + step] = True
            logits = steps(token, position, keys[:, None, None, :s + step + 1], caches)
            position = position + 1
        return history

    def forward(self, image_data: torch.Tensor, text_input_ids: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, image_start_idx: Optional[torch.Tensor] = None,
                output_positions: Optional[torch.Tensor] = None, packed: Optional[dict] = None) -> torch.Tensor:
        """Logits [B, S, V], or [N, V] at `output_positions` (flat indices into B*S) when given.

        packed: {position_ids, segment_ids [B, S], image_valid [B, K], skip_unused} for packed rows, whose
        image_data is [B, K, C, H, W] (see merge_packed)."""
        h = self.hidden_states(image_data, text_input_ids, key_padding_mask, image_start_idx, packed)
        if output_positions is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, output_positions)
        return self.text_model.lm_head(h)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; shared tensors counted once."""
    trainable = frozen = 0
    for p in module.parameters():  # parameters() already skips duplicates (ln_f, tied lm_head)
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def init_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """Normal(0, initializer_range) for linear/conv/embedding weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=initializer_range)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=initializer_range)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, ViTEmbeddings) and m.cls_embedding is not None:
            nn.init.normal_(m.cls_embedding, std=initializer_range)


def projector_init_(projector: FeedForwardNetwork) -> None:
    """Cerebras' projector init: kaiming_uniform(a=sqrt(5)) weights (= nn.Linear's default), zero biases."""
    for layer in projector.ffn:
        for lin in (layer.linear_layer, getattr(layer, "linear_layer_for_glu", None)):
            if lin is None:
                continue
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
