"""``FragmentLoader``: put a stored fragment on a model, by metadata or by key."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from fragjobs.comfy_nodes.handles import FRAGMENT_TYPE, MODEL_TYPE, FragjobsModel
from fragjobs.errors import (
    BaseModelMismatchError,
    FragjobsError,
    FragmentError,
    GateFailedError,
    InvalidInputError,
    NotFoundError,
)
from fragjobs.keys import validate_key

log = logging.getLogger("fragjobs")

FALL_BACK = "fall back to the full model"
RAISE = "raise an error"


class FragmentLoader:
    """Load a fragment from the library onto a model: the optimised model.

    The fragment comes from ``fragment_metadata`` (a :class:`FragmentExtractor` upstream) or
    from ``fragment_key`` (any key in the library: made by ``fragjobs run``, by the farm or
    in ComfyUI). Its stored bytes are checked against their hashes and it must be made on this
    model (sha256). A fragment that cannot be used (corrupt, failed its gate) is, as in
    ``fragjobs generate``, replaced by the full model with a warning that says why, or is an
    error when ``if_unusable`` says so. An unknown key or another base is always an error.
    """

    CATEGORY = "fragjobs"
    DESCRIPTION = (
        "Load a fragment (from FragmentExtractor, or by key from the fragjobs library) onto "
        "the model; hashes checked, loud fallback to the full model."
    )
    RETURN_TYPES = (MODEL_TYPE, "STRING")
    RETURN_NAMES = ("model", "status")
    OUTPUT_TOOLTIPS = (
        "The model with the fragment loaded (or the full model, if it fell back).",
        "Which fragment is used, or why the full model is.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From ProfilerModelLoader."}),
                "fragment_key": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "A fragment key from the library (`fragjobs fragments ls`); "
                        "leave empty when fragment_metadata is connected.",
                    },
                ),
                "if_unusable": (
                    [FALL_BACK, RAISE],
                    {"tooltip": "What to do when the fragment is corrupt or failed its gate."},
                ),
            },
            "optional": {
                "fragment_metadata": (FRAGMENT_TYPE, {"tooltip": "From FragmentExtractor."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, fragment_key: str | None = None) -> bool | str:
        """Reject a key that cannot be a fragment key (``[a-z0-9._-]``)."""
        if fragment_key and fragment_key.strip():
            try:
                validate_key(fragment_key.strip())
            except FragjobsError as exc:
                return str(exc)
        return True

    def load(
        self,
        model: FragjobsModel,
        fragment_key: str,
        if_unusable: str,
        fragment_metadata: Any = None,
    ) -> tuple[FragjobsModel, str]:
        from fragjobs import chain

        key = _chosen_key(fragment_key, fragment_metadata)
        ws = chain.workspace()
        try:
            row = ws.catalog.get_fragment(key)
        except NotFoundError:
            raise NotFoundError(
                f"fragment {key!r} is not in the library ({ws.settings.resolved_database_url}): "
                "`fragjobs fragments ls` lists the keys there"
            ) from None
        made_on = ws.catalog.get_base_model(row.base_model_id)
        if made_on.sha256 != model.sha256:
            raise BaseModelMismatchError(
                f"fragment {key} was made on {made_on.name} ({made_on.sha256[:12]}), not on "
                f"{model.name} ({model.sha256[:12]}): load {made_on.name} in ProfilerModelLoader"
            )
        loaded = chain.base(model.model, ws.settings)
        try:
            if row.status != "ready":
                reason = f" ({row.status_reason})" if row.status_reason else ""
                raise GateFailedError(f"fragment {key} is {row.status}{reason}")
            # Reads and hash-checks the stored fragment and builds its UNet, kept warm for
            # BatchGenerator (a corrupt fragment is marked so in the catalog, then raises).
            manifest, _unet = chain.warm_fragment_unet(ws, loaded, row)
        except FragmentError as exc:
            if if_unusable == RAISE:
                raise
            log.warning("FragmentLoader: %s; generating with the full model", exc)
            fallback = replace(
                model,
                fragment_key=None,
                fragment_steps=None,
                fragment_guidance=None,
                fallback_reason=str(exc),
            )
            return fallback, f"FULL MODEL: fragment unusable: {exc}"
        optimised = replace(
            model,
            fragment_key=key,
            fragment_steps=manifest.profiling.steps,
            fragment_guidance=manifest.profiling.guidance_scale,
            fallback_reason=None,
        )
        pruning = manifest.pruning
        return optimised, (
            f"fragment {key}: {pruning.heads_kept}/{pruning.heads_total} heads, "
            f"{manifest.profiling.steps} steps, guidance {manifest.profiling.guidance_scale}"
        )


def _chosen_key(fragment_key: str, fragment_metadata: Any) -> str:
    """The key of ``fragment_metadata`` or ``fragment_key``; exactly one must say one."""
    typed = (fragment_key or "").strip()
    given = getattr(fragment_metadata, "key", None)
    if given and typed and given != typed:
        raise InvalidInputError(
            f"fragment_metadata is fragment {given} but fragment_key says {typed}: "
            "clear fragment_key or disconnect fragment_metadata"
        )
    key = given or typed
    if not key:
        raise InvalidInputError(
            "no fragment: connect fragment_metadata (from FragmentExtractor) or type a key "
            "from the library in fragment_key"
        )
    return validate_key(key)
