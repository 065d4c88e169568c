"""Base models in the shared store (fragjobs.base_store): uploaded once, content-addressed and
in parts on S3 (moto over HTTP); fetched into a size-capped node cache, every file checked;
``fragjobs models add|ls`` answer in one line, ``ls`` without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import AWS_TEST_ENV, S3_REGION

from fragjobs.base_cache import BaseCache
from fragjobs.base_identity import hash_weight_files
from fragjobs.base_store import (
    add_base,
    base_object,
    check_stored,
    index_object,
    store_source,
)
from fragjobs.catalog import Catalog
from fragjobs.errors import (
    IntegrityError,
    InvalidInputError,
    ObjectNotFoundError,
    StorageError,
    UnknownModelError,
)
from fragjobs.storage import S3Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A diffusers folder written by ``save_pretrained`` (tiny-sd's architecture)."""
    from fragjobs.builtin.configs import build_tiny_sd

    folder = tmp_path_factory.mktemp("models") / "my-sd"
    build_tiny_sd().save_pretrained(folder)
    return folder


@pytest.fixture
def catalog(settings):
    catalog = Catalog.open_embedded(settings)
    yield catalog
    catalog.dispose()


@pytest.fixture
def store(moto_endpoint, s3_bucket):
    """An S3 store whose multipart threshold (1 MiB) is below the UNet file's size."""
    return S3Store(
        f"s3://{s3_bucket}/farm",
        endpoint_url=moto_endpoint,
        region=S3_REGION,
        multipart_threshold=2**20,
    )


def test_add_uploads_once_in_parts_and_registers_the_store_source(
    model_folder, store, catalog, settings, s3_admin
):
    added = add_base(model_folder, store=store, catalog=catalog, settings=settings)
    sha256 = hash_weight_files(model_folder, "my-sd")  # the id fragjobs gives the folder
    index = added.index
    assert (index.name, index.sha256, index.pipeline) == (
        "my-sd",
        sha256,
        "StableDiffusionPipeline",
    )
    files = sorted(
        p.relative_to(model_folder).as_posix() for p in model_folder.rglob("*") if p.is_file()
    )
    assert sorted(f.path for f in index.files) == files
    assert added.uploaded_files == len(files) and added.uploaded_bytes == index.size
    for file in index.files:  # each object carries its own sha256
        assert store.stat(base_object(sha256, file.path)).sha256 == file.sha256
    assert json.loads(store.get_bytes(index_object(sha256)))["sha256"] == sha256
    unet = s3_admin.head_object(
        Bucket=store.bucket,
        Key=f"farm/{base_object(sha256, 'unet/diffusion_pytorch_model.safetensors')}",
    )
    assert unet["ETag"].strip('"').endswith("-1")  # a multipart upload's ETag
    row = catalog.find_base_model(sha256)
    assert (row.name, row.source) == ("my-sd", store_source(sha256))

    again = add_base(model_folder, store=store, catalog=catalog, settings=settings)
    assert (again.uploaded_files, again.uploaded_bytes) == (0, 0)
    assert again.index == index and again.base_model.id == row.id
    assert len(catalog.list_base_models()) == 1
    assert check_stored(store, sha256) == index


def test_add_moves_a_registered_folder_to_the_store(model_folder, store, catalog, settings):
    sha256 = hash_weight_files(model_folder, "my-sd")
    catalog.get_or_create_base_model("my-sd", sha256, f"folder:{model_folder}")
    add_base(model_folder, store=store, catalog=catalog, settings=settings)
    assert catalog.find_base_model(sha256).source == f"store:{sha256}"


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda tmp: tmp / "missing", InvalidInputError, "is not a folder"),
        (lambda tmp: tmp, UnknownModelError, "no model_index.json"),
        (
            lambda tmp: _index(tmp, {"_class_name": "FluxPipeline", "transformer": ["x", "y"]}),
            UnknownModelError,
            "is a FluxPipeline, which fragjobs does not support; supported: "
            "StableDiffusionPipeline .*PixArtAlphaPipeline",
        ),
        (
            lambda tmp: _index(tmp, {"_class_name": "PixArtAlphaPipeline", "vae": ["a", "b"]}),
            UnknownModelError,
            "is a PixArtAlphaPipeline without its transformer",
        ),
        (
            lambda tmp: _index(tmp / "bad name", {"_class_name": "X", "unet": ["a", "b"]}),
            InvalidInputError,
            "give one with --name",
        ),
    ],
    ids=["missing", "not-diffusers", "unsupported", "no-denoiser", "bad-name"],
)
def test_bad_folders_are_refused_with_nothing_stored(
    tmp_path, store, catalog, settings, make, error, words
):
    with pytest.raises(error, match=words):
        add_base(make(tmp_path), store=store, catalog=catalog, settings=settings)
    assert store.list("bases/") == [] and catalog.list_base_models() == []


def test_fetch_checks_every_file_and_evicts_beyond_the_cap(
    model_folder, store, catalog, settings, tmp_path
):
    other = tmp_path / "other-sd"
    shutil.copytree(model_folder, other)  # same weights, another name: another base
    first = add_base(model_folder, store=store, catalog=catalog, settings=settings).index
    second = add_base(other, store=store, catalog=catalog, settings=settings).index
    assert first.sha256 != second.sha256
    cache = BaseCache(tmp_path / "cache", max_bytes=first.size + second.size // 2)

    folder = cache.fetch(store, first.sha256)
    assert folder == tmp_path / "cache" / first.sha256 / "my-sd"
    assert hash_weight_files(folder, "my-sd") == first.sha256
    assert cache.fetch(store, first.sha256) == folder  # a hit: nothing fetched
    assert cache.fetch(store, second.sha256).name == "other-sd"
    assert not cache.contains(first.sha256) and cache.contains(second.sha256)
    assert cache.total_bytes() == second.size <= cache.max_bytes
    assert [i.sha256 for i in cache.cached()] == [second.sha256]

    with pytest.raises(StorageError, match="raise FRAGJOBS_BASE_CACHE_MAX_BYTES"):
        BaseCache(tmp_path / "small", max_bytes=first.size - 1).fetch(store, first.sha256)
    with pytest.raises(ObjectNotFoundError, match="fragjobs models add"):
        cache.fetch(store, "0" * 64)


def test_a_damaged_stored_file_is_refused_and_never_cached(
    model_folder, store, catalog, settings, tmp_path, s3_admin
):
    index = add_base(model_folder, store=store, catalog=catalog, settings=settings).index
    name = base_object(index.sha256, "vae/config.json")
    recorded = store.stat(name).sha256
    s3_admin.put_object(  # behind the store's back, even keeping the recorded sha256
        Bucket=store.bucket, Key=f"farm/{name}", Body=b"{}", Metadata={"sha256": recorded}
    )
    cache = BaseCache(tmp_path / "cache", max_bytes=2**30)
    with pytest.raises(IntegrityError, match="vae/config.json"):
        cache.fetch(store, index.sha256)
    assert not cache.contains(index.sha256)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]

    store.delete(name)
    with pytest.raises(ObjectNotFoundError, match="missing 1 object"):
        check_stored(store, index.sha256)


def _index(folder: Path, document: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(document))
    return folder


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        "from fragjobs.cli import main\n"
        "try:\n"
        f"    main({list(args)!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('HEAVY', [m for m in ('torch', 'diffusers', 'celery') if m in sys.modules])\n"
        "sys.exit(code)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_models_add_and_ls_commands(model_folder, moto_endpoint, s3_bucket, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAGJOBS_", "AWS_"))}
    env.update(
        AWS_TEST_ENV,
        FRAGJOBS_DATA_DIR=str(tmp_path / "data"),
        FRAGJOBS_STORAGE_URL=f"s3://{s3_bucket}/farm",
        FRAGJOBS_S3_ENDPOINT_URL=moto_endpoint,
        FRAGJOBS_BROKER_URL="memory://",
    )
    bad = _cli(env, "models", "add", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "HEAVY []" in bad.stdout
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'} is not a folder: give a diffusers pipeline folder"
    ]

    added = _cli(env, "models", "add", str(model_folder), "--name", "mine")
    assert added.returncode == 0, added.stderr
    sha256 = hash_weight_files(model_folder, "mine")
    assert added.stdout.startswith(f"mine  {sha256}  ") and "uploaded 10 files" in added.stdout
    again = _cli(env, "models", "add", str(model_folder), "--name", "mine")
    assert "already in the store, nothing uploaded" in again.stdout

    listed = _cli(env, "models", "ls", "--json")
    assert listed.returncode == 0 and "HEAVY []" in listed.stdout, listed.stderr
    [row] = json.loads(listed.stdout.split("HEAVY")[0])
    assert row["name"] == "mine" and row["sha256"] == sha256 and row["source"] == f"store:{sha256}"
    assert row["size"] == sum(p.stat().st_size for p in model_folder.rglob("*") if p.is_file())
    assert row["nodes"] is None  # no Redis broker configured: nobody to ask
