"""Reuse on paraphrases (H3): does a prompt's fragment hold on other wordings of it?"""

from __future__ import annotations

from typing import Any

import torch

from fragjobs.base_text import prompt_embedding
from fragjobs.chain.fragments import fragment_unet, load_stored_fragment
from fragjobs.chain.knobs import DEFAULT_VALIDATION_SEEDS
from fragjobs.chain.stored import update_manifest
from fragjobs.chain.validate_step import fragment_base, generation_config, quality
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.errors import InvalidInputError
from fragjobs.generation import generate_images, with_unet
from fragjobs.keys import check_seeds, normalise_prompt
from fragjobs.validation import evaluate_gate, load_thresholds


def measure_reuse(
    key: str,
    paraphrases: list[str],
    *,
    seeds: list[int] | tuple[int, ...] = DEFAULT_VALIDATION_SEEDS[:2],
    ws: Workspace | None = None,
    prompt: str | None = None,
) -> dict[str, Any]:
    """Gate the fragment on paraphrases of its prompt: full vs fragment, same seeds.

    Returns ``{"pass_rate", "n", "rows"}`` and records it in the manifest's ``reuse`` layer.
    ``prompt``: the prompt the paraphrases are of, when it is not the fragment's own (the
    base's model-level fragment used for it): then nothing is recorded in the manifest,
    which is shared by every prompt that uses it.
    """
    ws = ws or workspace()
    if not paraphrases:
        raise InvalidInputError("give at least one paraphrase to measure reuse")
    texts = [p.strip() for p in paraphrases if normalise_prompt(p)]
    seeds = check_seeds(list(seeds))
    fragment = load_stored_fragment(key, ws)
    manifest = fragment.manifest
    loaded = fragment_base(ws, key)
    frag_pipe = with_unet(loaded.pipe, fragment_unet(loaded, fragment))
    gen = generation_config(manifest, batch_size=len(seeds))
    thresholds = load_thresholds(ws.settings.thresholds_path)
    own = torch.tensor(manifest.reuse.prompt_embedding or [])
    if prompt is not None:
        own = prompt_embedding(loaded.pipe, prompt)
    rows = []
    for text in texts:
        full = generate_images(loaded.pipe, text, seeds, gen)
        frag = generate_images(frag_pipe, text, seeds, gen)
        metrics = quality(ws, loaded, full, frag, text)
        gate = evaluate_gate(metrics, thresholds, seeds)
        embedding = prompt_embedding(loaded.pipe, text)
        similarity = float(own @ embedding) if own.shape == embedding.shape else None
        rows.append(
            {
                "prompt": text,
                "ssim": metrics.ssim,
                "clip_delta": metrics.clip_delta,
                "passed": gate.passed,
                "similarity": None if similarity is None else round(similarity, 6),
            }
        )
    pass_rate = round(sum(r["passed"] for r in rows) / len(rows), 6)
    if prompt is None:
        reuse = manifest.reuse.model_copy(update={"pass_rate": pass_rate, "paraphrases": rows})
        update_manifest(ws, key, {"reuse": reuse})
    return {"pass_rate": pass_rate, "n": len(rows), "rows": rows}
