"""A base model's own reading of a prompt: its pooled text embedding and whether its text
encoder reads all of it."""

from __future__ import annotations

from typing import Any

import torch

from fragjobs.families import family_of


@torch.no_grad()
def prompt_embedding(pipe: Any, prompt: str) -> torch.Tensor:
    """The model's own text embedding of ``prompt`` (pooled, L2-normalised, float32, CPU).

    Used to find a fragment made for a similar prompt (``cosine_clip_text``) and to say how
    close a paraphrase is. Which encoder gives it is the pipeline family's choice
    (:mod:`fragjobs.families`): SD's text encoder, SDXL's second (projected) one, the
    mean of PixArt's T5 states.
    """
    family = family_of(pipe)
    tokenizer = getattr(pipe, family.pooled_tokenizer)
    encoder = getattr(pipe, family.pooled_encoder)
    tokens = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    output = encoder(tokens.input_ids.to(encoder.device))
    pooled = getattr(output, family.pooled_output) if family.pooled_output else None
    if pooled is None:  # no pooled output (T5): the mean of the prompt's token states
        mask = tokens.attention_mask.to(encoder.device).unsqueeze(-1).float()
        pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    pooled = pooled[0].float().cpu()
    return pooled / pooled.norm().clamp_min(1e-12)


def truncation_note(pipe: Any, prompt: str) -> str | None:
    """Why the pipeline's tokenizer cuts ``prompt`` short, or None when it reads all of it.

    Text encoders read a fixed number of tokens (CLIP: 77, start and end included); a longer
    prompt is truncated silently by diffusers. The note says how much is read.
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
        return None
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= limit:
        return None
    kept = tokenizer.decode(ids[: limit - 1], skip_special_tokens=True).strip()
    return (
        f"the prompt is {len(ids)} tokens long; the text encoder reads {limit}: "
        f"only {kept!r} shapes the images"
    )
