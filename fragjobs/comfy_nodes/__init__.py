"""fragjobs in ComfyUI: four custom nodes and the workflow that chains them.

``ProfilerModelLoader`` (model, prompt → model, profiling_data) → ``FragmentExtractor``
(threshold, fidelity → fragment_metadata: key, gate verdict, speed-up, heads kept) →
``FragmentLoader`` (metadata or a key from the library → optimised model) →
``BatchGenerator`` (prompt, seed list "0-7" → an ``IMAGE`` batch for ``SaveImage``).

The nodes call the public chain (:mod:`fragjobs.chain`), so what they make lands in the same
library as ``fragjobs run`` and the farm (``FRAGJOBS_*`` settings) and a seed gives the same
image as ``fragjobs generate``. Install: ``python -m fragjobs.comfy_nodes /path/to/ComfyUI``
(links this folder into ``custom_nodes/``) with fragjobs installed in ComfyUI's Python.
The workflow is in ``example_workflows/`` (UI format; API format in ``example_workflows/api/``),
where ComfyUI's template browser finds it.

Nothing here imports ComfyUI at import time; inside ComfyUI the nodes drive its progress bar
and honour its Cancel button (:mod:`~fragjobs.comfy_nodes.progress`).
"""

from __future__ import annotations

from fragjobs.comfy_nodes.batch_generator import BatchGenerator
from fragjobs.comfy_nodes.fragment_extractor import FragmentExtractor
from fragjobs.comfy_nodes.fragment_loader import FragmentLoader
from fragjobs.comfy_nodes.profiler_model_loader import ProfilerModelLoader

NODE_CLASS_MAPPINGS = {
    "ProfilerModelLoader": ProfilerModelLoader,
    "FragmentExtractor": FragmentExtractor,
    "FragmentLoader": FragmentLoader,
    "BatchGenerator": BatchGenerator,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ProfilerModelLoader": "Profiler Model Loader (fragjobs)",
    "FragmentExtractor": "Fragment Extractor (fragjobs)",
    "FragmentLoader": "Fragment Loader (fragjobs)",
    "BatchGenerator": "Batch Generator (fragjobs)",
}

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "BatchGenerator",
    "FragmentExtractor",
    "FragmentLoader",
    "ProfilerModelLoader",
]
