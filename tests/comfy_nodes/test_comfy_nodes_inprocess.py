"""The four nodes called as ComfyUI calls them, here without ComfyUI: the same library and
images as the chain, clear errors for bad input, a loud fallback for an unusable fragment."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch

from fragjobs import chain
from fragjobs.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from fragjobs.comfy_nodes.fragment_loader import FALL_BACK, RAISE
from fragjobs.comfy_nodes.handles import (
    FRAGMENT_TYPE,
    MODEL_TYPE,
    PROFILE_TYPE,
    ProfilingData,
)
from fragjobs.comfy_nodes.install import PACKAGE_DIR, link_into_comfyui
from fragjobs.comfy_nodes.progress import NodeProgress
from fragjobs.errors import (
    BaseModelMismatchError,
    FragmentIntegrityError,
    InvalidInputError,
    NotFoundError,
)
from fragjobs.keys import FRAGMENT_FILE, fragment_object

PROFILER, EXTRACTOR, LOADER, GENERATOR = (
    NODE_CLASS_MAPPINGS[name]()
    for name in ("ProfilerModelLoader", "FragmentExtractor", "FragmentLoader", "BatchGenerator")
)


@pytest.fixture
def library(settings, ready_fragment_template, monkeypatch):
    """The environment's library (what the nodes use) holding a copy of the ready fragment."""
    ready_fragment_template.copy_to(settings.data_dir)
    monkeypatch.setattr(chain.STATE, "workspaces", {})
    monkeypatch.setattr(chain.STATE, "fragment_unets", OrderedDict())
    workspace = chain.workspace()
    yield workspace
    workspace.close()


@pytest.fixture
def tiny_sd(library):
    """ProfilerModelLoader's model output for tiny-sd, profiling off."""
    model, profiling = PROFILER.load("tiny-sd", "a red circle", False, 0, "0")
    assert profiling.profile_id is None
    return model


def test_the_package_imports_without_comfyui_or_torch():
    code = (
        "import sys\n"
        "import fragjobs.comfy_nodes\n"
        "print(sorted(m for m in ('comfy', 'folder_paths', 'torch', 'diffusers')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_four_nodes_with_the_seeds_inputs_and_outputs():
    expected = {
        "ProfilerModelLoader": (
            ["model_name", "prompt", "profiling_enabled", "steps", "profile_seeds"],
            (MODEL_TYPE, PROFILE_TYPE),
        ),
        "FragmentExtractor": (
            [
                "profiling_data",
                "extraction_threshold",
                "fidelity",
                "caching",
                "validation_seeds",
                "measure_speedup",
            ],
            (FRAGMENT_TYPE, "STRING"),
        ),
        "FragmentLoader": (
            ["model", "fragment_key", "if_unusable", "fragment_metadata"],
            (MODEL_TYPE, "STRING"),
        ),
        "BatchGenerator": (
            ["model", "prompt", "seed_list", "steps", "guidance", "batch_size"],
            ("IMAGE",),
        ),
    }
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) == set(expected)
    for name, (inputs, outputs) in expected.items():
        node = NODE_CLASS_MAPPINGS[name]
        spec = node.INPUT_TYPES()
        assert [*spec["required"], *spec.get("optional", {})] == inputs, name
        assert outputs == node.RETURN_TYPES
        assert len(node.RETURN_NAMES) == len(outputs)
        assert callable(getattr(node(), node.FUNCTION))
        assert node.CATEGORY == "fragjobs"
    models = NODE_CLASS_MAPPINGS["ProfilerModelLoader"].INPUT_TYPES()["required"]["model_name"]
    assert models[0][0] == "shapes" and {"tiny-sd", "shapes"} <= set(models[0])


def test_a_fragment_from_the_library_makes_the_images_of_fragjobs_generate(
    library, tiny_sd, ready_fragment_template
):
    key, prompt = ready_fragment_template.key, ready_fragment_template.prompt
    optimised, status = LOADER.load(tiny_sd, key, RAISE)
    assert optimised.fragment_key == key and status.startswith(f"fragment {key}")
    assert (optimised.fragment_steps, optimised.fragment_guidance) == (4, 7.5)

    (images,) = GENERATOR.generate(optimised, prompt, "3,1-2", 0, 0.0, 2)
    reference = chain.generate(prompt, seeds=[3, 1, 2], key=key, model="tiny-sd", batch_size=2)
    assert images.shape == (3, 64, 64, 3) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert torch.equal(images, reference.images.permute(0, 2, 3, 1))
    assert len(library.catalog.lineage(key)["job_ids"]) == 2  # the node's job and the reference

    (full,) = GENERATOR.generate(tiny_sd, prompt, "3", 4, 7.5, 1)
    assert not torch.equal(full[0], images[0])  # the full model is another model


def test_an_unusable_fragment_falls_back_loudly_or_raises(
    library, tiny_sd, ready_fragment_template, caplog
):
    key = ready_fragment_template.key
    library.store.put_bytes(fragment_object("tiny-sd", key, FRAGMENT_FILE), b"flipped")
    with pytest.raises(FragmentIntegrityError):
        LOADER.load(tiny_sd, key, RAISE)
    assert library.catalog.get_fragment(key).status == "corrupt"

    with caplog.at_level(logging.WARNING, logger="fragjobs"):
        model, status = LOADER.load(tiny_sd, key, FALL_BACK)
    assert model.fragment_key is None and f"fragment {key} is corrupt" in model.fallback_reason
    assert status.startswith("FULL MODEL: fragment unusable")
    assert "generating with the full model" in caplog.text


def test_bad_inputs_are_errors_that_say_what_to_do(library, tiny_sd, ready_fragment_template):
    key = ready_fragment_template.key
    with pytest.raises(InvalidInputError, match="prompt is empty"):
        GENERATOR.generate(tiny_sd, "  ", "0", 0, 0.0, 1)
    with pytest.raises(InvalidInputError, match="seed_list item 'x'"):
        GENERATOR.generate(tiny_sd, "a red circle", "0,x", 0, 0.0, 1)
    with pytest.raises(InvalidInputError, match="prompt is empty"):
        PROFILER.load("tiny-sd", "", True, 0, "0")
    with pytest.raises(NotFoundError, match="not in the library.*fragjobs fragments ls"):
        LOADER.load(tiny_sd, "tiny-sd_0000000000000000_00000000", FALL_BACK)
    with pytest.raises(InvalidInputError, match="connect fragment_metadata .* or type a key"):
        LOADER.load(tiny_sd, " ", FALL_BACK)
    with pytest.raises(InvalidInputError, match="invalid key"):
        LOADER.load(tiny_sd, "No Such/Key", FALL_BACK)
    other_base = replace(tiny_sd, name="shapes", sha256="0" * 64)
    with pytest.raises(BaseModelMismatchError, match="was made on tiny-sd"):
        LOADER.load(other_base, key, FALL_BACK)
    optimised, _status = LOADER.load(tiny_sd, key, RAISE)
    with pytest.raises(InvalidInputError, match="profiled at 4 steps.*got steps 20"):
        GENERATOR.generate(optimised, "a red circle", "0", 20, 0.0, 1)
    not_profiled = ProfilingData(None, "tiny-sd", "a red circle")
    with pytest.raises(InvalidInputError, match="turn profiling_enabled on"):
        EXTRACTOR.extract(not_profiled, 0.75, 0.9, True, "1000", False)
    profiled = ProfilingData("tiny-sd_0000000000000000_00000000", "tiny-sd", "a red circle")
    for threshold in (0.0, 1.5):
        with pytest.raises(InvalidInputError, match=r"extraction_threshold must be in \(0, 1\]"):
            EXTRACTOR.extract(profiled, threshold, 0.9, True, "1000", False)
    assert (
        NODE_CLASS_MAPPINGS["FragmentLoader"].VALIDATE_INPUTS("Bad Key").startswith("invalid key")
    )


def test_progress_counts_denoising_steps_and_leaves_no_hook_behind():
    unet = torch.nn.Linear(2, 2)
    progress = NodeProgress(total=3)
    with progress.per_unet_call(unet, unet, None):
        for _ in range(2):
            unet(torch.zeros(1, 2))
    assert progress.done == 2
    unet(torch.zeros(1, 2))
    assert progress.done == 2 and not unet._forward_pre_hooks
    progress.check_interrupt()  # outside ComfyUI: nothing to cancel
    progress.finish()
    assert progress.done == 3


def test_link_into_a_comfyui_folder(tmp_path):
    (tmp_path / "ComfyUI" / "custom_nodes").mkdir(parents=True)
    link = link_into_comfyui(tmp_path / "ComfyUI")
    assert link.resolve() == PACKAGE_DIR and (link / "__init__.py").is_file()
    assert link_into_comfyui(tmp_path / "ComfyUI" / "custom_nodes") == link  # again: a no-op
    with pytest.raises(InvalidInputError, match="exists already"):
        link_into_comfyui(tmp_path / "ComfyUI", name="..")
    with pytest.raises(InvalidInputError, match="not a ComfyUI folder"):
        link_into_comfyui(tmp_path)


def test_the_extractors_speed_up_is_measured_and_recorded(library, ready_fragment_template):
    from fragjobs.comfy_nodes.fragment_extractor import measure_fragment_speedup

    key = ready_fragment_template.key
    speedup = measure_fragment_speedup(key, library)
    performance = chain.load_stored_fragment(key, library).manifest.performance
    assert speedup > 0
    assert performance.measured_speedup == pytest.approx(speedup, rel=1e-3)
    ratio = performance.measured_latency_full_ms / performance.measured_latency_fragment_ms
    assert ratio == pytest.approx(speedup, rel=1e-3)
