"""The shipped workflow: API and UI formats name the real nodes and inputs, and agree."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest

from fragjobs.comfy_nodes import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = files("fragjobs.comfy_nodes").joinpath("example_workflows")
NAME = "fragjobs_seed_variants.json"
WIDGET_TYPES = ("STRING", "INT", "FLOAT", "BOOLEAN")  # and combos (lists)
# ComfyUI's own nodes the workflow uses: (widget inputs in order, link inputs).
CORE_NODES = {
    "PrimitiveStringMultiline": (["value"], []),
    "PreviewAny": ([], ["source"]),
    "SaveImage": (["filename_prefix"], ["images"]),
}


def _api() -> dict:
    return json.loads(WORKFLOWS.joinpath("api", NAME).read_text())


def _ui() -> dict:
    return json.loads(WORKFLOWS.joinpath(NAME).read_text())


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _inputs(class_type: str) -> tuple[list[str], list[str]]:
    """(widget inputs, link-only inputs) of a node, in the order ComfyUI shows them."""
    if class_type in CORE_NODES:
        return CORE_NODES[class_type]
    spec = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    merged = {**spec["required"], **spec.get("optional", {})}
    widgets = [
        name
        for name, (kind, *_options) in merged.items()
        if isinstance(kind, list) or kind in WIDGET_TYPES
    ]
    return widgets, [name for name in merged if name not in widgets]


def test_the_api_workflow_chains_the_four_nodes_with_their_inputs():
    api = _api()
    types = {node["class_type"] for node in api.values()}
    assert set(NODE_CLASS_MAPPINGS) <= types
    assert types - set(NODE_CLASS_MAPPINGS) <= set(CORE_NODES)
    for node_id, node in api.items():
        widgets, links = _inputs(node["class_type"])
        required = set(widgets) | set(links)
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            required -= set(
                NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES().get("optional", {})
            )
        assert required <= set(node["inputs"]) <= set(widgets) | set(links), node_id
        for name, value in node["inputs"].items():
            if _is_link(value):
                assert value[0] in api, f"node {node_id} input {name} links to nothing"
    # profile -> extract -> load -> generate -> save, one prompt for profiling and generation
    assert api["3"]["inputs"]["profiling_data"] == ["2", 1]
    assert api["5"]["inputs"]["fragment_metadata"] == ["3", 0]
    assert api["5"]["inputs"]["model"] == ["2", 0]
    assert api["7"]["inputs"]["model"] == ["5", 0]
    assert api["8"]["inputs"]["images"] == ["7", 0]
    assert api["2"]["inputs"]["prompt"] == api["7"]["inputs"]["prompt"] == ["1", 0]
    assert api["2"]["inputs"]["model_name"] == "shapes"


def test_the_ui_workflow_is_the_api_workflow_laid_out():
    api, ui = _api(), _ui()
    nodes = {str(node["id"]): node for node in ui["nodes"]}
    assert set(nodes) == set(api)
    links = {link[0]: link for link in ui["links"]}
    for node_id, node in nodes.items():
        want = api[node_id]
        assert node["type"] == want["class_type"]
        widgets, _links = _inputs(node["type"])
        values = [want["inputs"].get(name) for name in widgets]
        shown = node.get("widgets_values", [])
        for name, expected, got in zip(widgets, values, shown, strict=False):
            if not _is_link(expected):
                assert got == expected, f"node {node_id} widget {name}"
        for slot in node["inputs"]:
            if slot.get("link") is None:
                assert not _is_link(want["inputs"].get(slot["name"])), (node_id, slot["name"])
                continue
            _id, origin, origin_slot, target, _target_slot, _type = links[slot["link"]]
            assert str(target) == node_id
            assert want["inputs"][slot["name"]] == [str(origin), origin_slot]


@pytest.mark.parametrize("relative", ["example_workflows/" + NAME, "example_workflows/api/" + NAME])
def test_the_workflows_ship_with_the_package(relative):
    """pyproject's package-data names them, so a wheel carries them."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["fragjobs"]
    path = f"comfy_nodes/{relative}"
    assert (ROOT / "fragjobs" / path).is_file()
    assert any(fnmatch.fnmatch(path, pattern) for pattern in patterns), patterns
