"""A base found by what it is: the whole chain on a base added to an S3 store (moto over HTTP)
and fetched into a fresh node cache; a folder changed after registration refused by hash."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import S3_REGION

from fragjobs import chain
from fragjobs.base_cache import BaseCache
from fragjobs.base_store import add_base, store_source
from fragjobs.chain.bases import held_bases
from fragjobs.config import get_settings
from fragjobs.errors import BaseModelMismatchError
from fragjobs.families import denoiser


@pytest.fixture(params=["tiny-sd", "tiny-sdxl", "tiny-pixart"])
def model_folder(request, tmp_path):
    """A diffusers folder written by ``save_pretrained``: each family's tiny architecture."""
    from fragjobs.builtin import BUILTINS

    folder = tmp_path / "models" / "my-sd"
    BUILTINS[request.param].build().save_pretrained(folder)
    return folder


@pytest.fixture
def s3_ws(settings, moto_endpoint, s3_bucket, monkeypatch, tmp_path):
    """A workspace on an S3 store, with a node cache of its own."""
    monkeypatch.setenv("FRAGJOBS_STORAGE_URL", f"s3://{s3_bucket}/farm")
    monkeypatch.setenv("FRAGJOBS_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("FRAGJOBS_S3_REGION", S3_REGION)
    monkeypatch.setenv("FRAGJOBS_CACHE_DIR", str(tmp_path / "node-cache"))
    get_settings.cache_clear()
    workspace = chain.Workspace.open(get_settings())
    chain.reset_process_state()
    yield workspace
    workspace.close()
    chain.reset_process_state()
    get_settings.cache_clear()


def test_the_chain_runs_on_a_base_fetched_from_the_store(s3_ws, model_folder, tmp_path):
    added = add_base(
        model_folder, store=s3_ws.store, catalog=s3_ws.catalog, settings=s3_ws.settings
    )
    sha256 = added.index.sha256
    shutil.rmtree(model_folder)  # from now on the base can only come from the store
    report = chain.run(
        "a blue square at the top",
        model=store_source(sha256),
        variants=2,
        profile_seeds=[0, 1],
        validation_seeds=[1000],
        steps=4,
        out_dir=tmp_path / "out",
        ws=s3_ws,
        progress=False,
        measure_memory=False,
    )
    cache = BaseCache.from_settings(s3_ws.settings)
    assert cache.folder == tmp_path / "node-cache" / "bases"
    assert [index.sha256 for index in cache.cached()] == [sha256]
    row = s3_ws.catalog.get_fragment(report.key)
    base_row = s3_ws.catalog.get_base_model(row.base_model_id)
    assert (base_row.id, base_row.name, base_row.source) == (
        added.base_model.id,
        "my-sd",
        f"store:{sha256}",
    )
    assert len(report.generation.image_uris) == 2
    # a later step, in a fresh process, finds the base again by the catalog's source
    chain.reset_process_state()
    again = chain.validate(report.key, seeds=[1000], ws=s3_ws, progress=False)
    assert again.key == report.key
    assert held_bases(s3_ws.settings) == ([sha256], [sha256])


def test_a_folder_changed_after_registration_is_refused_by_hash(ws, model_folder):
    profiled = chain.profile(
        "a red circle", model=str(model_folder), seeds=[0], steps=2, ws=ws, progress=False
    )
    registered = ws.catalog.get_base_model(profiled.base_model_id)
    assert registered.source == f"folder:{model_folder.resolve()}"
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_folder, local_files_only=True)
    with torch.no_grad():
        next(denoiser(pipe).parameters()).add_(0.01)
    pipe.save_pretrained(model_folder)  # still a valid pipeline, other weights
    objects_before = ws.store.list("")
    chain.reset_process_state()

    with pytest.raises(BaseModelMismatchError) as raised:
        chain.extract(profiled.profile_id, ws=ws)
    message = str(raised.value)
    assert "\n" not in message
    assert f"base model my-sd changed since it was registered: {model_folder.resolve()}" in message
    assert registered.sha256[:12] in message
    assert ws.catalog.list_fragments() == [] and ws.store.list("") == objects_before
