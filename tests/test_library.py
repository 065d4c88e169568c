"""fragjobs.library on a real fragment (the session's ready tiny-sd fragment, copied): the
lookups answer from the catalog's columns, with the manifests gone from the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update

from fragjobs import chain
from fragjobs.catalog import Catalog
from fragjobs.chain.stored import read_manifest
from fragjobs.errors import FragjobsError
from fragjobs.keys import MANIFEST_FILE, fragment_object
from fragjobs.library import lookup_prompt, lookup_similar
from models import FragmentRow


@pytest.fixture
def ws(ready_fragment_template, tmp_path: Path):
    workspace = chain.Workspace.open(ready_fragment_template.copy_to(tmp_path / "data"))
    yield workspace
    workspace.close()


def test_lookups_answer_with_the_manifests_gone(ws, ready_fragment_template) -> None:
    key, prompt = ready_fragment_template.key, ready_fragment_template.prompt
    row = ws.catalog.get_fragment(key)
    [stored] = ws.catalog.ready_embeddings_since(row.base_model_id)
    embedding = np.frombuffer(stored.embedding, "<f4")  # written by extract, from the manifest
    assert embedding.shape == (len(read_manifest(ws, row).reuse.prompt_embedding),)

    ws.store.delete(fragment_object("tiny-sd", key, MANIFEST_FILE))
    with pytest.raises(FragjobsError):
        read_manifest(ws, row)  # really gone

    assert lookup_prompt(ws.catalog, row.base_model_id, f"  {prompt.upper()} ").key == key
    hit = lookup_similar(ws.catalog, row.base_model_id, embedding, lambda r: read_manifest(ws, r))
    assert hit is not None and hit.fragment.key == key and hit.similarity == pytest.approx(1.0)


def test_an_embedding_missing_from_the_row_is_read_from_the_manifest_once(
    ws, ready_fragment_template
) -> None:
    key = ready_fragment_template.key
    row = ws.catalog.get_fragment(key)
    embedding = np.asarray(read_manifest(ws, row).reuse.prompt_embedding, np.float32)
    with ws.catalog._transaction() as session:  # a row from before the column existed
        session.execute(update(FragmentRow).values(prompt_embedding=None))
    reads: list[str] = []

    def counted(r):
        reads.append(r.key)
        return read_manifest(ws, r)

    for _ in range(2):
        hit = lookup_similar(ws.catalog, row.base_model_id, embedding, counted)
        assert hit is not None and hit.fragment.key == key
    assert reads == [key]
    with Catalog(ws.catalog.url) as other_process:  # a new index: the catalog has it now
        assert lookup_similar(other_process, row.base_model_id, embedding, counted) is not None
    assert reads == [key]
