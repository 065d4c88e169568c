"""The chain, in process: profile → extract → validate → generate (DESIGN §1).

Each step is a function that reads its inputs from the catalog and the store and writes its
outputs there, so the same functions serve the embedded default, the CLI, the farm's tasks
(through :mod:`fragjobs.chain.delivery`) and the Python API. Example::

    import fragjobs
    p = fragjobs.profile("a red circle on the left", model="shapes")
    f = fragjobs.extract(p.profile_id)
    v = fragjobs.validate(f.key)
    g = fragjobs.generate("a red circle on the left", variants=8)

Bad input is rejected before anything is written; a step that fails half-way removes what it
wrote (objects and catalog rows), so no half-written fragment is ever left behind.

Modules, one concern each: :mod:`~fragjobs.chain.state` (what a process keeps warm, with an
explicit reset), :mod:`~fragjobs.chain.workspaces` (settings, catalog, store, loaded bases),
:mod:`~fragjobs.chain.knobs` (the one set of knobs), one module per step
(``profile_step``, ``extract_step``, ``validate_step``, ``generate_step``),
:mod:`~fragjobs.chain.fragments` (hash-checked loads, warm UNets, ``apply_fragment_``),
:mod:`~fragjobs.chain.ladder` (the gate ladder), :mod:`~fragjobs.chain.reuse` (H3),
:mod:`~fragjobs.chain.jobs` (job rows, poison guard), :mod:`~fragjobs.chain.run_chain` (the
whole run with its report) and :mod:`~fragjobs.chain.delivery` (the steps as JSON messages).

Names are imported from their modules on first use, so that importing one light module
(``fragjobs.chain.knobs``, which a command checks its input with) does not pay for torch.
"""

from __future__ import annotations

from fragjobs.lazy_exports import lazy_getattr

_EXPORTS = {
    "collect_garbage": "fragjobs.chain.maintenance",
    "rebuild_catalog": "fragjobs.chain.maintenance",
    "remove_fragment": "fragjobs.chain.maintenance",
    "ChainKnobs": "fragjobs.chain.knobs",
    "DEFAULT_MAX_ATTEMPTS": "fragjobs.chain.jobs",
    "DEFAULT_PROFILE_SEEDS": "fragjobs.chain.knobs",
    "DEFAULT_VALIDATION_SEEDS": "fragjobs.chain.knobs",
    "ExtractResult": "fragjobs.chain.extract_step",
    "FragmentCheck": "fragjobs.chain.revalidation",
    "GATE_ATTEMPTS": "fragjobs.chain.ladder",
    "GenerationResult": "fragjobs.chain.generate_step",
    "ProcessState": "fragjobs.chain.state",
    "ProfileResult": "fragjobs.chain.profile_step",
    "RevalidationReport": "fragjobs.chain.revalidation",
    "RunReport": "fragjobs.chain.run_chain",
    "STATE": "fragjobs.chain.state",
    "ValidationResult": "fragjobs.chain.validate_step",
    "WARM_FRAGMENT_UNETS": "fragjobs.chain.state",
    "Workspace": "fragjobs.chain.workspaces",
    "apply_fragment_": "fragjobs.chain.fragments",
    "base": "fragjobs.chain.bases",
    "base_of": "fragjobs.chain.bases",
    "check_variants": "fragjobs.chain.knobs",
    "conservative_config": "fragjobs.chain.ladder",
    "extract": "fragjobs.chain.extract_step",
    "extract_and_validate": "fragjobs.chain.ladder",
    "extract_message": "fragjobs.chain.delivery",
    "extraction_config": "fragjobs.chain.knobs",
    "fragment_status_message": "fragjobs.chain.delivery",
    "fragment_unet": "fragjobs.chain.fragments",
    "generate": "fragjobs.chain.generate_step",
    "generate_message": "fragjobs.chain.delivery",
    "guard_task_delivery": "fragjobs.chain.jobs",
    "head_guard": "fragjobs.chain.knobs",
    "load_stored_fragment": "fragjobs.chain.fragments",
    "measure_reuse": "fragjobs.chain.reuse",
    "profile": "fragjobs.chain.profile_step",
    "profile_message": "fragjobs.chain.delivery",
    "read_manifest": "fragjobs.chain.stored",
    "record_performance": "fragjobs.chain.fragments",
    "reset_process_state": "fragjobs.chain.state",
    "revalidate": "fragjobs.chain.revalidation",
    "revalidation_lock": "fragjobs.chain.locks",
    "run": "fragjobs.chain.run_chain",
    "validate": "fragjobs.chain.validate_step",
    "validate_message": "fragjobs.chain.delivery",
    "warm_cache": "fragjobs.chain.workspaces",
    "warm_fragment_keys": "fragjobs.chain.state",
    "warm_fragment_unet": "fragjobs.chain.fragments",
    "workspace": "fragjobs.chain.workspaces",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(globals(), _EXPORTS)
