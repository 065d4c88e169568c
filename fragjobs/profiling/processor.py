"""An attention processor that measures every head while computing the usual output.

It computes exactly what diffusers' ``AttnProcessor2_0`` computes for SD-style attention
(self and cross); on the steps chosen for recording it materialises the attention
probabilities so that per-head statistics can be taken:

* ``energy``: mean squared norm of the head's contribution to the block output, i.e. the
  head's output pushed through its own column slice of ``to_out[0]``;
* ``entropy`` (cross-attention): mean entropy of the head's attention over text tokens;
* ``prompt_mass`` (cross-attention): mean attention mass on the prompt's word tokens
  (not the start token, not padding).

Statistics are kept per batch element so that a batched multi-seed run yields per-seed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class HeadAccumulator:
    """Running sums for one attention module, per batch element and head."""

    kind: str
    heads: int
    energy: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    prompt_mass: torch.Tensor | None = None
    calls: int = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        setattr(self, name, value if current is None else current + value)


@dataclass
class RecordingState:
    """Shared switch and context for all profiling processors of one UNet."""

    recording: bool = False
    token_mask: torch.Tensor | None = None  # (batch, text_len) 1 on word tokens
    modules: dict[str, HeadAccumulator] = field(default_factory=dict)


class ProfilingAttnProcessor:
    """Drop-in replacement for ``AttnProcessor2_0`` that records per-head statistics."""

    def __init__(self, name: str, state: RecordingState) -> None:
        self.name = name
        self.state = state

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, seq_len, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.state.recording:
            scores = (query @ key.transpose(-1, -2)) / math.sqrt(head_dim)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            head_out = probs @ value  # (batch, heads, queries, head_dim)
            self._record(attn, head_out, probs if is_cross else None)
        else:
            head_out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = head_out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @torch.no_grad()
    def _record(self, attn, head_out: torch.Tensor, probs: torch.Tensor | None) -> None:
        batch, heads, _, head_dim = head_out.shape
        acc = self.state.modules.setdefault(
            self.name, HeadAccumulator("cross" if probs is not None else "self", heads)
        )
        weight = attn.to_out[0].weight.view(-1, heads, head_dim).float()  # (out, heads, d)
        # |o_h W_h^T|^2 summed over output channels, mean over tokens: (batch, heads)
        contrib = torch.einsum("bhqd,chd->bhqc", head_out.float(), weight)
        acc.add("energy", contrib.pow(2).sum(-1).mean(-1).cpu())
        if probs is not None:
            p = probs.float()
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(-1)
            acc.add("entropy", entropy.cpu())
            mask = self.state.token_mask
            if mask is not None and mask.shape[-1] == p.shape[-1]:
                mass = (p * mask.to(p)[:, None, None, :]).sum(-1).mean(-1)
                acc.add("prompt_mass", mass.cpu())
        acc.calls += 1
