"""A user's own diffusers folder through the whole chain: every step reloads the base from
where the catalog says it came from (its folder), not from its name."""

from __future__ import annotations

import json

import pytest

from fragjobs import chain


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl", "tiny-pixart"])
def model_folder(request, tmp_path_factory):
    """A diffusers folder written by ``save_pretrained``: tiny-sd's architecture (SD 1.x),
    tiny-sdxl's (StableDiffusionXLPipeline), tiny-pixart's (PixArtAlphaPipeline, a DiT)."""
    from fragjobs.builtin import BUILTINS

    folder = tmp_path_factory.mktemp("models") / "my-sd-folder"
    BUILTINS[request.param].build().save_pretrained(folder)
    return folder


def test_the_chain_runs_on_a_local_folder(ws, tmp_path, model_folder):
    report = chain.run(
        "a blue square at the top",
        model=str(model_folder),
        variants=2,
        profile_seeds=[0, 1],
        validation_seeds=[1000],
        out_dir=tmp_path / "out",
        ws=ws,
        progress=False,
    )
    row = ws.catalog.get_fragment(report.key)
    base_row = ws.catalog.get_base_model(row.base_model_id)
    assert base_row.name == "my-sd-folder"
    assert base_row.source == f"folder:{model_folder.resolve()}"
    assert len(report.generation.image_uris) == 2
    assert report.out_dir.parent == tmp_path / "out"
    summary = json.loads((report.out_dir / "metrics_summary.json").read_text())
    assert summary["knobs"]["model"] == str(model_folder)
    # a later step given no model finds the base again by the catalog's source
    chain.reset_process_state()
    again = chain.validate(report.key, seeds=[1000], ws=ws, progress=False)
    assert again.key == report.key
