"""fragjobs: prompt-specialised fragments of diffusers text-to-image models.

The chain's steps, for diffusers users::

    import fragjobs
    p = fragjobs.profile("a dog on a jet ski", model="tiny-sd")
    f = fragjobs.extract(p.profile_id)
    fragjobs.validate(f.key)
    fragjobs.generate("a dog on a jet ski", variants=8)

    pipe = fragjobs.load_base("tiny-sd").pipe     # or your own DiffusionPipeline
    fragjobs.apply_fragment_(pipe, f.key)         # hashes and base checked
    pipe("a dog on a jet ski")

Heavy modules are imported on first use, so ``import fragjobs`` stays fast.
"""

from __future__ import annotations

from fragjobs.lazy_exports import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "profile": "fragjobs.chain",
    "extract": "fragjobs.chain",
    "validate": "fragjobs.chain",
    "generate": "fragjobs.chain",
    "run": "fragjobs.chain",
    "apply_fragment_": "fragjobs.chain",
    "extraction_config": "fragjobs.chain",
    "workspace": "fragjobs.chain",
    "Workspace": "fragjobs.chain",
    "load_base": "fragjobs.base_models",
    "ExtractionConfig": "fragjobs.extraction",
    "FragmentManifest": "fragjobs.manifest",
    "Settings": "fragjobs.config",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr(globals(), _EXPORTS)
