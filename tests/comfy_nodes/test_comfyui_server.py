"""The nodes in the real ComfyUI (../shared/vendor/ComfyUI), started headless on the CPU.

One server for the module, in its own virtual environment (``.venv-comfy``: ComfyUI's
requirements, torchvision among them, must never enter ``.venv``; ``.ci/run`` creates it),
with the package linked into a temporary ``custom_nodes/`` and ``FRAGJOBS_DATA_DIR`` shared
with this test, so both sides use one library: a fragment made by fragjobs here loads in
ComfyUI by its key, and the one made by the shipped workflow in ComfyUI is in the catalog and
makes the same images as ``fragjobs generate``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fragjobs import chain
from fragjobs.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from fragjobs.comfy_nodes.fragment_loader import RAISE
from fragjobs.comfy_nodes.install import LINK_NAME, link_into_comfyui
from fragjobs.config import Settings
from fragjobs.keys import generation_object

ROOT = Path(__file__).resolve().parents[2]
COMFY_PYTHON = ROOT / ".venv-comfy" / "bin" / "python"
SHARED = Path(os.environ.get("FRAGJOBS_SHARED_DIR", ROOT.parent / "shared"))
RUN_CPU = SHARED / "comfyui" / "run_cpu.py"
WORKFLOW = files("fragjobs.comfy_nodes").joinpath(
    "example_workflows", "api", "fragjobs_seed_variants.json"
)
BOOT_TIMEOUT_S = 300
PROMPT_TIMEOUT_S = 600
SHAPES_STEPS = 4  # the shipped workflow at 4 steps, 2 seeds: the same code, a CPU-sized run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not COMFY_PYTHON.is_file(),
        reason=f"needs ComfyUI's virtual environment {COMFY_PYTHON.parent.parent} "
        "(.ci/run creates it; see ../shared/comfyui/README.md)",
    ),
    pytest.mark.skipif(not RUN_CPU.is_file(), reason=f"needs the vendored ComfyUI ({RUN_CPU})"),
]


@dataclass
class ComfyUI:
    """A running ComfyUI: its address, folders, the library it shares and its log."""

    url: str
    base: Path
    settings: Settings
    log: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return (
            json.loads(body) if response.headers.get_content_type() == "application/json" else body
        )

    def post(self, path: str, data: Any) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(data).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@dataclass
class Run:
    """A finished prompt: its id, its history entry and the websocket messages it sent."""

    prompt_id: str
    history: dict[str, Any]
    messages: list[dict[str, Any]]

    @property
    def status(self) -> str:
        return self.history["status"]["status_str"]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [m["data"] for m in self.messages if m["type"] == kind]

    def error(self) -> dict[str, Any]:
        [error] = [d for kind, d in self.history["status"]["messages"] if kind == "execution_error"]
        return error


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory, ready_fragment_template) -> Iterator[ComfyUI]:
    """ComfyUI on a free port, the nodes linked in, sharing a library that holds the ready
    tiny-sd fragment (made by fragjobs' chain)."""
    folder = tmp_path_factory.mktemp("comfyui")
    base = folder / "base"
    (base / "custom_nodes").mkdir(parents=True)
    link_into_comfyui(base)  # what a user runs: python -m fragjobs.comfy_nodes /path/to/ComfyUI
    settings = ready_fragment_template.copy_to(folder / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAGJOBS_")}
    env.update(FRAGJOBS_DATA_DIR=str(settings.data_dir), PYTHONUNBUFFERED="1")
    port = _free_port()
    log = folder / "comfyui.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(COMFY_PYTHON), str(RUN_CPU), "--cpu", "--listen", "127.0.0.1"]
            + ["--port", str(port), "--base-directory", str(base)]
            + ["--database-url", "sqlite:///:memory:"],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ComfyUI(f"http://127.0.0.1:{port}", base, settings, log)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{server.log_tail()}")
            try:
                server.get("/system_stats")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"ComfyUI did not answer in {BOOT_TIMEOUT_S} s:\n{server.log_tail()}"
                    )
                time.sleep(1)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def library(comfyui) -> Iterator[chain.Workspace]:
    """This process's view of the library ComfyUI uses."""
    workspace = chain.Workspace.open(comfyui.settings)
    yield workspace
    workspace.close()


def run_prompt(
    server: ComfyUI,
    workflow: dict[str, Any],
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> Run:
    """Queue ``workflow``, follow it on the websocket until it ends, return its history."""
    from tornado.websocket import websocket_connect

    client_id = uuid.uuid4().hex

    async def follow() -> tuple[str, list[dict[str, Any]]]:
        ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        connection = await websocket_connect(ws_url)
        messages: list[dict[str, Any]] = []
        code, answer = server.post("/prompt", {"prompt": workflow, "client_id": client_id})
        assert code == 200, answer
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + PROMPT_TIMEOUT_S
        try:
            while True:
                left = deadline - time.monotonic()
                raw = await asyncio.wait_for(connection.read_message(), timeout=max(left, 1))
                assert raw is not None, "ComfyUI closed the websocket:\n" + server.log_tail()
                if not isinstance(raw, str):
                    continue  # a binary preview
                message = json.loads(raw)
                data = message.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                messages.append(message)
                if on_message is not None:
                    on_message(message)
                kind = message["type"]
                if kind in ("execution_success", "execution_error", "execution_interrupted"):
                    return prompt_id, messages
        finally:
            connection.close()

    prompt_id, messages = asyncio.run(follow())
    for _ in range(50):  # the history entry is written right after the last message
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history:
            return Run(prompt_id, history[prompt_id], messages)
        time.sleep(0.2)
    pytest.fail(f"no history for {prompt_id}:\n{server.log_tail()}")


def shipped_workflow(**inputs: dict[str, Any]) -> dict[str, Any]:
    """The shipped API workflow with some inputs changed: ``{"7": {"seed_list": "0-2"}}``."""
    workflow = json.loads(WORKFLOW.read_text())
    for node_id, changes in inputs.items():
        workflow[node_id]["inputs"].update(changes)
    return workflow


def library_workflow(key: str, prompt: str, seed_list: str, batch_size: int = 4) -> dict:
    """tiny-sd (not profiled) → FragmentLoader by key → BatchGenerator → SaveImage."""
    return {
        "1": {
            "class_type": "ProfilerModelLoader",
            "inputs": {
                "model_name": "tiny-sd",
                "prompt": prompt,
                "profiling_enabled": False,
                "steps": 0,
                "profile_seeds": "0",
            },
        },
        "2": {
            "class_type": "FragmentLoader",
            "inputs": {"model": ["1", 0], "fragment_key": key, "if_unusable": RAISE},
        },
        "3": {
            "class_type": "BatchGenerator",
            "inputs": {
                "model": ["2", 0],
                "prompt": prompt,
                "seed_list": seed_list,
                "steps": 0,
                "guidance": 0.0,
                "batch_size": batch_size,
            },
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "lib"}},
    }


def saved_images(server: ComfyUI, run: Run, node_id: str) -> list[np.ndarray]:
    """The PNGs SaveImage wrote, decoded (H, W, 3 uint8), fetched through ComfyUI's /view."""
    out = []
    for image in run.history["outputs"][node_id]["images"]:
        query = urllib.parse.urlencode(
            {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]}
        )
        png = server.get(f"/view?{query}")
        out.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    return out


def as_saveimage_pixels(images) -> list[np.ndarray]:
    """Float (N, 3, H, W) in [0, 1] as ComfyUI's SaveImage writes them (truncated to uint8)."""
    pixels = np.clip(255.0 * images.permute(0, 2, 3, 1).numpy(), 0, 255).astype(np.uint8)
    return list(pixels)


def store_pixels(ws: chain.Workspace, job_id: str, seed: int) -> np.ndarray:
    png = ws.store.get_bytes(generation_object(job_id, f"{seed}.png"))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def max_difference(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b, strict=True))


def test_object_info_lists_the_four_nodes_with_their_inputs(comfyui):
    info = comfyui.get("/object_info")
    for name, node in NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} not loaded:\n{comfyui.log_tail()}"
        spec = node.INPUT_TYPES()
        assert list(info[name]["input"]["required"]) == list(spec["required"])
        assert list(info[name]["input"].get("optional", {})) == list(spec.get("optional", {}))
        assert info[name]["output"] == list(node.RETURN_TYPES)
        assert info[name]["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
        assert info[name]["category"] == "fragjobs"
    assert info["BatchGenerator"]["output"] == ["IMAGE"]
    models = info["ProfilerModelLoader"]["input"]["required"]["model_name"][0]
    assert {"shapes", "tiny-sd"} <= set(models)
    # ComfyUI's template browser offers the shipped workflow
    assert comfyui.get("/workflow_templates") == {LINK_NAME: ["fragjobs_seed_variants"]}


def test_the_shipped_workflow_makes_the_images_of_fragjobs_generate(comfyui, library):
    seeds = [0, 1, 2]
    workflow = shipped_workflow(
        **{
            "2": {"steps": SHAPES_STEPS, "profile_seeds": "0-1"},
            "3": {"validation_seeds": "1000-1001"},
            "7": {"seed_list": "0-2", "batch_size": 4},
        }
    )
    run = run_prompt(comfyui, workflow)
    assert run.status == "success", json.dumps(run.history["status"])[:3000] + comfyui.log_tail()

    # The fragment made in ComfyUI is in the library, ready, with what the node reported.
    [summary] = run.history["outputs"]["4"]["text"]
    key = summary.split(":", 1)[0]
    assert "passed the gate" in summary and "speed-up" in summary, summary
    fragment = library.catalog.get_fragment(key)
    assert fragment.status == "ready" and fragment.prompt == "a red circle on the left"
    assert run.history["outputs"]["6"]["text"][0].startswith(f"fragment {key}: ")
    [job_id] = library.catalog.lineage(key)["job_ids"]  # BatchGenerator's job
    job = library.catalog.get_job(job_id)
    assert (job.status, job.seeds, job.used_fallback) == ("done", seeds, False)

    # Progress on the nodes' bars: profiling and generation count denoising steps.
    progress = {}
    for event in run.events("progress"):
        progress.setdefault(event["node"], []).append((event["value"], event["max"]))
    assert progress["2"][-1] == (SHAPES_STEPS, SHAPES_STEPS)
    assert len(progress["2"]) >= SHAPES_STEPS
    assert progress["7"][-1] == (SHAPES_STEPS, SHAPES_STEPS)  # 3 seeds: one batch

    # Saved images: one per seed, the model's size, not blank, not all alike.
    saved = saved_images(comfyui, run, "8")
    assert len(saved) == len(seeds)
    for pixels in saved:
        assert pixels.shape == (64, 64, 3)
        assert pixels.std() > 10, "a blank image"
    assert max_difference(saved[:1], saved[1:2]) > 0

    # The same images as `fragjobs generate --key KEY --seeds 0,1,2`, made in this process.
    reference = chain.generate(
        "a red circle on the left",
        seeds=seeds,
        key=key,
        model="shapes",
        batch_size=4,
        ws=library,
        progress=False,
    )
    assert reference.fragment_key == key and not reference.used_fallback
    # SaveImage truncates to uint8 where fragjobs rounds: compare like with like.
    assert max_difference(saved, as_saveimage_pixels(reference.images)) == 0
    ours = [store_pixels(library, reference.job_id, s) for s in seeds]
    theirs = [store_pixels(library, job_id, s) for s in seeds]
    assert max_difference(theirs, ours) == 0  # both jobs' PNGs in the store
    assert max_difference(saved, ours) <= 1


def test_a_fragment_made_by_fragjobs_loads_in_comfyui_by_key(
    comfyui, library, ready_fragment_template
):
    key, prompt = ready_fragment_template.key, ready_fragment_template.prompt
    jobs_before = set(library.catalog.lineage(key)["job_ids"])
    run = run_prompt(comfyui, library_workflow(key, prompt, "5,7-8"))
    assert run.status == "success", json.dumps(run.history["status"])[:3000]
    [job_id] = set(library.catalog.lineage(key)["job_ids"]) - jobs_before
    assert library.catalog.get_job(job_id).fragment_key == key

    reference = chain.generate(
        prompt, seeds=[5, 7, 8], key=key, model="tiny-sd", ws=library, progress=False
    )
    saved = saved_images(comfyui, run, "4")
    assert max_difference(saved, as_saveimage_pixels(reference.images)) == 0


def test_bad_inputs_are_node_errors_and_the_server_keeps_serving(comfyui, ready_fragment_template):
    key, prompt = ready_fragment_template.key, ready_fragment_template.prompt
    # Checked before anything runs: the prompt is refused with the node and the reason.
    code, answer = comfyui.post("/prompt", {"prompt": library_workflow(key, prompt, "1,,x")})
    assert code == 400
    [error] = answer["node_errors"]["3"]["errors"]
    assert error["details"].startswith("seed_list - seed_list item '' is not a seed")
    code, answer = comfyui.post(
        "/prompt", {"prompt": shipped_workflow(**{"3": {"extraction_threshold": 1.5}})}
    )
    assert code == 400
    [error] = answer["node_errors"]["3"]["errors"]
    assert (error["type"], error["details"]) == ("value_bigger_than_max", "extraction_threshold")

    # Known only when the node runs: the run ends with the node's error, one clear line.
    unknown = "tiny-sd_0000000000000000_00000000"
    run = run_prompt(comfyui, library_workflow(unknown, prompt, "0"))
    error = run.error()
    assert (run.status, error["node_id"], error["node_type"]) == ("error", "2", "FragmentLoader")
    assert error["exception_message"].startswith(f"fragment '{unknown}' is not in the library")
    run = run_prompt(comfyui, library_workflow(key, "   ", "0"))
    error = run.error()
    assert (error["node_type"], error["exception_type"]) == (
        "BatchGenerator",
        "fragjobs.errors.InvalidInputError",
    )
    assert error["exception_message"].strip() == "prompt is empty: give a non-blank text prompt"

    assert comfyui.get("/system_stats")["system"]["comfyui_version"]
    run = run_prompt(comfyui, library_workflow(key, prompt, "9"))
    assert run.status == "success"
    assert len(run.history["outputs"]["4"]["images"]) == 1


def test_cancel_stops_generation_between_steps(comfyui, library, ready_fragment_template):
    key, prompt = ready_fragment_template.key, ready_fragment_template.prompt
    jobs_before = set(library.catalog.lineage(key)["job_ids"])
    cancelled: list[dict[str, Any]] = []

    def cancel_once_generating(message: dict[str, Any]) -> None:
        if message["type"] == "progress" and message["data"]["node"] == "3" and not cancelled:
            cancelled.append(message["data"])
            comfyui.post("/interrupt", {})

    seeds = "100-163"  # 64 images, one per pipeline call: far longer than a cancel takes
    run = run_prompt(comfyui, library_workflow(key, prompt, seeds, 1), cancel_once_generating)
    assert cancelled, "generation never reported progress"
    [interrupted] = run.events("execution_interrupted")
    assert (interrupted["node_id"], interrupted["node_type"]) == ("3", "BatchGenerator")
    steps_done = max(e["value"] for e in run.events("progress") if e["node"] == "3")
    assert steps_done < 64 * 4 / 2, "the cancel came too late to stop anything"
    assert "4" not in run.history["outputs"]  # nothing saved
    [job_id] = set(library.catalog.lineage(key)["job_ids"]) - jobs_before
    job = library.catalog.get_job(job_id)
    assert job.status == "failed"
    assert len(library.catalog.list_images(job_id)) < 64

    run = run_prompt(comfyui, library_workflow(key, prompt, "164"))
    assert run.status == "success"
