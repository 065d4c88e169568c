"""Base models: built-ins offline and deterministic, folders hashed and cached, clear errors."""

from __future__ import annotations

import pytest
import torch

from fragjobs.base_identity import hash_weight_files
from fragjobs.base_models import identify, load_base
from fragjobs.base_text import prompt_embedding
from fragjobs.builtin import build_byte_tokenizer
from fragjobs.errors import InvalidInputError, UnknownModelError


def test_tiny_sd_is_deterministic_and_identified(settings):
    a, b = load_base("tiny-sd", settings=settings), load_base("tiny-sd", settings=settings)
    assert a.info.sha256 == b.info.sha256 and len(a.info.sha256) == 64
    assert (settings.data_dir / "base_hashes.json").is_file()
    for (name, p), (_, q) in zip(
        a.pipe.unet.state_dict().items(), b.pipe.unet.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    assert identify(a.pipe) == a.info


def test_building_a_builtin_does_not_touch_the_callers_rng(settings):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_base("tiny-sd", settings=settings)
    assert torch.equal(torch.rand(3), expected)


def test_a_saved_folder_loads_and_its_hash_covers_the_weights(settings, tmp_path):
    loaded = load_base("tiny-sd", settings=settings)
    folder = tmp_path / "tiny-folder"
    loaded.pipe.save_pretrained(folder)
    again = load_base(str(folder), settings=settings)
    assert again.info.source == f"folder:{folder.resolve()}"
    assert again.info.sha256 == hash_weight_files(folder.resolve(), "tiny-folder")
    assert identify(again.pipe).sha256 == again.info.sha256
    weights = next(folder.rglob("diffusion_pytorch_model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert hash_weight_files(folder.resolve(), "tiny-folder") != again.info.sha256


@pytest.mark.parametrize("model", ["nope", "./missing-dir", ""])
def test_unknown_models_list_what_is_available(settings, model):
    error = InvalidInputError if model == "" else UnknownModelError
    with pytest.raises(error) as info:
        load_base(model, settings=settings)
    if model:
        for name in ("tiny-sd", "sd15-shape", "shapes"):
            assert name in str(info.value)


def test_folder_without_model_index_is_refused(settings, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError, match="model_index.json"):
        load_base(str(tmp_path / "empty"), settings=settings)


def test_byte_tokenizer_marks_padding_and_takes_any_text():
    tok = build_byte_tokenizer()
    enc = tok("héllo ☃", padding="max_length", max_length=77, truncation=True)
    ids = enc["input_ids"]
    assert ids[0] == 256 and 257 in ids and ids[-1] == 258
    assert sum(enc["attention_mask"]) == len("héllo ☃".encode()) + 2
    assert tok.decode(ids, skip_special_tokens=True) == "héllo ☃"


def test_prompt_embeddings_are_unit_vectors_that_tell_prompts_apart(settings):
    pipe = load_base("tiny-sd", settings=settings).pipe
    a, b = prompt_embedding(pipe, "a red circle"), prompt_embedding(pipe, "a red circle")
    c = prompt_embedding(pipe, "zzzz qqqq")
    assert torch.allclose(a, b) and abs(float(a.norm()) - 1) < 1e-5
    assert float(a @ c) < 0.9999
