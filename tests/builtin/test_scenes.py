"""Procedural scenes: seeded sampling, held-out split, rendering and captions."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fragjobs.builtin import captions, reading, scenes
from fragjobs.builtin.scenes import SceneSpec, ShapeSpec


def _spec(shape="circle", colour="red", size="large", position="left", background="black"):
    return SceneSpec(background, (ShapeSpec(shape, colour, size, position),))


def _mentions(text: str, attribute: str, value: str) -> bool:
    return any(word in text.lower() for word in captions.attribute_words(attribute, value))


def test_sampling_and_rendering_are_deterministic_for_a_seed():
    def draw(seed):
        specs = scenes.sample_specs(
            40, torch.Generator().manual_seed(seed), held_out=False, two_shapes=0.3
        )
        return specs, scenes.render(specs)

    specs_a, images_a = draw(7)
    specs_b, images_b = draw(7)
    specs_c, _ = draw(8)
    assert specs_a == specs_b
    assert torch.equal(images_a, images_b)
    assert specs_a != specs_c
    assert any(len(s.objects) == 2 for s in specs_a)


@pytest.mark.parametrize("two_shapes", [0.0, 0.5])
def test_held_out_combinations_never_sampled_for_training(two_shapes):
    g = torch.Generator().manual_seed(0)
    specs = scenes.sample_specs(2000, g, held_out=False, two_shapes=two_shapes)
    triples = {obj.triple for s in specs for obj in s.objects}
    assert not any(scenes.is_held_out(s) for s in specs)
    assert not triples & scenes.HELD_OUT
    assert len(triples) > 150  # the rest of the 200 combinations is covered


def test_held_out_sampling_gives_only_held_out_combinations():
    specs = scenes.sample_specs(
        300, torch.Generator().manual_seed(1), held_out=True, two_shapes=0.5
    )
    assert all(scenes.is_held_out(s) and len(s.objects) == 1 for s in specs)
    assert {s.objects[0].triple for s in specs} == set(scenes.HELD_OUT)
    assert {s.background for s in specs} == set(scenes.BACKGROUNDS)


def test_enumerated_specs_split_all_combinations():
    train = scenes.enumerate_specs(held_out=False)
    held = scenes.enumerate_specs(held_out=True)
    assert len(train) + len(held) == len(scenes.enumerate_specs(held_out=None))
    assert all(scenes.is_held_out(s) for s in held)
    assert not any(scenes.is_held_out(s) for s in train)


def _foreground(images: torch.Tensor, background: str = "black") -> torch.Tensor:
    colour = torch.tensor(scenes.BACKGROUNDS[background]) / 255.0
    return (images - colour[:, None, None]).abs().sum(dim=1)  # (n, 64, 64)


def test_render_places_the_shape_where_its_position_says():
    images = scenes.render([_spec(position=p) for p in ("left", "right", "top", "bottom")])
    assert images.shape == (4, 3, 64, 64)
    assert images.min() >= 0.0 and images.max() <= 1.0
    left, right, top, bottom = _foreground(images)
    assert left[:, :32].sum() > 0.95 * left.sum() > 0
    assert right[:, 32:].sum() > 0.95 * right.sum() > 0
    assert top[:32].sum() > 0.95 * top.sum() > 0
    assert bottom[32:].sum() > 0.95 * bottom.sum() > 0


def test_render_uses_the_named_colours_and_sizes():
    images = scenes.render(
        [_spec(colour="red"), _spec(colour="blue"), _spec(colour="red", size="small")]
    )
    red, blue, _ = images
    centre = (slice(None), slice(28, 36), slice(14, 22))  # around the left position
    assert red[centre].mean(dim=(1, 2)).argmax() == 0
    assert blue[centre].mean(dim=(1, 2)).argmax() == 2
    large_area, _, small_area = _foreground(images).sum(dim=(1, 2))
    assert large_area > 2 * small_area


def test_render_draws_every_shape_differently():
    images = scenes.render([_spec(shape=s) for s in scenes.SHAPES])
    flat = images.flatten(1)
    distances = torch.cdist(flat, flat)
    assert (distances + torch.eye(len(scenes.SHAPES)) * 1e3).min() > 3.0


def test_read_background_recovers_every_background():
    specs = scenes.sample_specs(60, torch.Generator().manual_seed(2), held_out=None)
    assert reading.read_background(scenes.render(specs)) == [s.background for s in specs]


def test_captions_name_every_attribute_and_fit_the_tokenizer():
    rng = random.Random(0)
    specs = scenes.sample_specs(100, torch.Generator().manual_seed(3), held_out=None)
    for spec in specs:
        templates = captions.SINGLE_TEMPLATES if len(spec.objects) == 1 else captions.PAIR_TEMPLATES
        for template in range(len(templates)):
            text = captions.caption(spec, rng, template)
            assert len(text.encode("utf-8")) <= scenes.MAX_CAPTION_BYTES
            for obj in spec.objects:
                for attribute in ("colour", "shape", "size", "position"):
                    assert _mentions(text, attribute, getattr(obj, attribute)), (text, attribute)
            assert _mentions(text, "background", spec.background), text


def test_caption_omission_keeps_colour_shape_and_position():
    spec = _spec(shape="star", colour="green", size="small", position="top", background="pink")
    texts = [captions.caption(spec, random.Random(i), omit=1.0) for i in range(20)]
    for text in texts:
        assert _mentions(text, "colour", "green")
        assert _mentions(text, "shape", "star")
        assert _mentions(text, "position", "top")
        assert not _mentions(text, "size", "small")
        assert not _mentions(text, "background", "pink")


def test_paraphrases_differ_in_text_but_share_attributes():
    spec = _spec(shape="triangle", colour="purple", size="small", position="center")
    texts = captions.paraphrases(spec)
    assert texts[0] == captions.canonical_caption(spec)
    assert texts[0] == "a small purple triangle in the center, black background"
    assert len(texts) == len(set(texts)) >= 5
    for text in texts:
        for attribute, value in spec.attributes().items():
            assert _mentions(text, attribute, value), (text, attribute)
    assert texts == captions.paraphrases(spec)


def test_plain_caption_names_size_and_background_only_when_asked():
    spec = _spec(shape="star", colour="red", size="large", position="left", background="grey")
    assert captions.plain_caption(spec) == "a large red star on the left on a grey background"
    assert captions.plain_caption(spec, size=False, background=False) == "a red star on the left"
    two = SceneSpec(
        "white",
        (ShapeSpec("star", "red", "small", "left"), ShapeSpec("cross", "blue", "small", "right")),
    )
    with pytest.raises(ValueError, match="one-shape"):
        captions.plain_caption(two)


def test_two_shape_captions_stay_short_and_complete():
    spec = SceneSpec(
        "white",
        (
            ShapeSpec("triangle", "purple", "small", "bottom"),
            ShapeSpec("triangle", "orange", "large", "top"),
        ),
    )
    canonical = captions.canonical_caption(spec)
    assert len(canonical.encode()) <= scenes.MAX_CAPTION_BYTES
    for text in captions.paraphrases(spec):
        assert _mentions(text, "colour", "purple") and _mentions(text, "colour", "orange")


def test_invalid_specs_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="choose one of"):
        ShapeSpec("hexagon", "red", "small", "left")
    with pytest.raises(ValueError, match="invisible"):
        _spec(colour="white", background="white")
    with pytest.raises(ValueError, match="opposite sides"):
        SceneSpec(
            "grey",
            (
                ShapeSpec("circle", "red", "small", "left"),
                ShapeSpec("star", "blue", "small", "top"),
            ),
        )


class _OneHotCLIP(torch.nn.Module):
    """A stand-in CLIP whose text embedding of prompt i is the i-th unit vector and whose
    image embeddings are set by the test."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
        self.text_projection = self.visual_projection = torch.nn.Identity()
        self.image_targets: list[int] = []

    def text_model(self, input_ids):
        return SimpleNamespace(pooler_output=F.one_hot(input_ids[:, 0], self.size).float())

    def vision_model(self, pixel_values):
        targets = torch.tensor(self.image_targets[: pixel_values.shape[0]])
        self.image_targets = self.image_targets[pixel_values.shape[0] :]
        return SimpleNamespace(pooler_output=F.one_hot(targets, self.size).float())


class _IndexTokenizer:
    """Tokenises each canonical caption to its index among all single-shape scenes."""

    model_max_length = 77

    def __init__(self) -> None:
        specs = scenes.enumerate_specs(held_out=None)
        self.index = {captions.canonical_caption(s): i for i, s in enumerate(specs)}

    def __call__(self, texts, **kwargs):
        return SimpleNamespace(input_ids=torch.tensor([[self.index[t]] for t in texts]))


def test_read_attributes_reads_the_best_matching_caption():
    specs = scenes.enumerate_specs(held_out=None)
    model = _OneHotCLIP(len(specs))
    model.image_targets = [0, 17, 345, len(specs) - 1]
    readings = reading.read_attributes(model, _IndexTokenizer(), torch.rand(4, 3, 64, 64))
    assert readings == [specs[i].attributes() for i in (0, 17, 345, len(specs) - 1)]
