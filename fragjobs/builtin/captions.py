"""Captions of the built-in scenes (:mod:`fragjobs.builtin.scenes`): the text side of the
shapes model's training data.

* :func:`caption` writes one of many paraphrases (templates × synonyms), :func:`paraphrases`
  lists several and :func:`canonical_caption` gives the fixed wording used for evaluation;
  :func:`plain_caption` writes the canonical words in the forms users write (size word and
  background phrase optional).
* :func:`attribute_words` lists every word a caption may use for an attribute's value.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from fragjobs.builtin.scenes import MAX_CAPTION_BYTES, POSITIONS, SceneSpec, ShapeSpec

_COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "cobalt", "royal blue"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "plum"),
    "orange": ("orange", "amber", "tangerine"),
    "white": ("white", "snow-white", "ivory"),
    "black": ("black", "jet-black", "ebony"),
}
_BACKGROUND_WORDS = {
    "grey": ("grey", "gray", "ash grey"),
    "white": ("white", "plain white", "snowy"),
    "black": ("black", "dark", "pitch-black"),
    "pink": ("pink", "rose", "pastel pink"),
    "teal": ("teal", "dark cyan", "sea green"),
}
_SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape", "dot"),
    "square": ("square", "box", "block", "square shape"),
    "triangle": ("triangle", "triangular shape", "three-sided shape"),
    "star": ("star", "five-pointed star", "star shape"),
    "cross": ("cross", "plus sign", "plus shape"),
}
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "to the left", "on the left side", "in the left half"),
    "right": (
        "on the right",
        "at the right",
        "to the right",
        "on the right side",
        "in the right half",
    ),
    "top": ("at the top", "near the top", "in the upper part", "at the top edge"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part", "at the bottom edge"),
    "center": ("in the center", "in the middle", "in the centre", "at the center"),
}
_POSITION_WORDS = {
    "left": ("left",),
    "right": ("right",),
    "top": ("top", "upper part"),
    "bottom": ("bottom", "lower part"),
    "center": ("center", "middle", "centre"),
}
_BACKGROUND_PHRASES = (
    " on {a} {word} background",
    " over {a} {word} background",
    " against {a} {word} backdrop",
    ", {word} background",
    " with {a} {word} background",
)
_NOUN_PHRASES = ("{size}{colour} {shape}", "{size}{shape} in {colour}")

SINGLE_TEMPLATES = (
    "{np} {pos}{bg}",
    "{pos_word}: {np}{bg}",
    "{bg_np} with {np} {pos}",
    "there is {np} {pos}{bg}",
    "{np_bare} {pos}{bg}",
    "a picture of {np} {pos}{bg}",
    "{Pos}, {np}{bg}",
    "{np} placed {pos}{bg}",
)
"""Caption templates for one shape: ``{np}`` is a noun phrase such as "a small crimson disc",
``{pos}`` a position phrase, ``{bg}`` a background phrase (or empty when omitted)."""

PAIR_TEMPLATES = (
    "{np1} {pos1} and {np2} {pos2}{bg}",
    "{np1} {pos1}, {np2} {pos2}{bg}",
    "{pos_word1}: {np1}; {pos_word2}: {np2}{bg}",
)
"""Caption templates for two shapes (numbered fields per shape)."""

_CANONICAL_POSITION = {p: phrases[0] for p, phrases in _POSITION_PHRASES.items()}


def canonical_caption(spec: SceneSpec) -> str:
    """The fixed wording of a scene, used for evaluation prompts and zero-shot reading.

    Example: ``"a small red circle on the left, grey background"``; two shapes:
    ``"small red circle left, large blue star right, grey background"``.
    """
    if len(spec.objects) == 1:
        obj = spec.objects[0]
        phrase = f"{obj.size} {obj.colour} {obj.shape}"
        return f"{_article(phrase)} {phrase} {_CANONICAL_POSITION[obj.position]}, " + (
            f"{spec.background} background"
        )
    parts = [f"{o.size} {o.colour} {o.shape} {o.position}" for o in spec.objects]
    return ", ".join(parts) + f", {spec.background} background"


def plain_caption(spec: SceneSpec, *, size: bool = True, background: bool = True) -> str:
    """A one-shape scene as a user writes it: the canonical words in the first template, with
    the size word and the background phrase each named or left out.

    Example: ``"a small red circle on the left on a grey background"``; without both:
    ``"a red circle on the left"``.
    """
    if len(spec.objects) != 1:
        raise ValueError(f"plain_caption takes a one-shape scene, got {len(spec.objects)} shapes")
    return _fill(SINGLE_TEMPLATES[0], spec, _first, [size], background)


def caption(
    spec: SceneSpec,
    rng: random.Random,
    template: int | None = None,
    *,
    omit: float = 0.0,
) -> str:
    """One caption of ``spec``: a random template filled with random synonyms.

    Colour, shape and position are always named. Captions never exceed
    :data:`MAX_CAPTION_BYTES` UTF-8 bytes: a filling that would is redone with the canonical
    words, and then falls back to :func:`canonical_caption`.

    Args:
        spec: the scene.
        rng: source of the template and word choices (advanced).
        template: index into :data:`SINGLE_TEMPLATES` (or :data:`PAIR_TEMPLATES` for two
            shapes); random when ``None``.
        omit: probability of leaving out each of the size words and the background phrase.

    Returns:
        The caption text.
    """
    templates = SINGLE_TEMPLATES if len(spec.objects) == 1 else PAIR_TEMPLATES
    if template is None:
        template = rng.randrange(len(templates))
    if not 0 <= template < len(templates):
        raise ValueError(f"template must be in [0, {len(templates)}), got {template}")
    show_size = [rng.random() >= omit for _ in spec.objects]
    show_background = rng.random() >= omit
    for pick in (rng.choice, _first):
        text = _fill(templates[template], spec, pick, show_size, show_background)
        if len(text.encode("utf-8")) <= MAX_CAPTION_BYTES:
            return text
    return canonical_caption(spec)


def paraphrases(spec: SceneSpec) -> list[str]:
    """Distinct complete captions of ``spec`` (the canonical one first), one per template.

    Every paraphrase names all attributes; the words are drawn deterministically per
    template, so the list is the same on every call.
    """
    templates = SINGLE_TEMPLATES if len(spec.objects) == 1 else PAIR_TEMPLATES
    texts = [canonical_caption(spec)]
    texts += [caption(spec, random.Random(i), i) for i in range(len(templates))]
    return list(dict.fromkeys(texts))


def attribute_words(attribute: str, value: str) -> tuple[str, ...]:
    """The words captions may use for an attribute value (e.g. ``("red", "crimson", ...)``)."""
    tables = {
        "colour": _COLOUR_WORDS,
        "shape": _SHAPE_WORDS,
        "size": _SIZE_WORDS,
        "position": {p: _POSITION_PHRASES[p] + _POSITION_WORDS[p] for p in POSITIONS},
        "background": _BACKGROUND_WORDS,
    }
    if attribute not in tables:
        raise ValueError(f"unknown attribute {attribute!r}: choose one of {', '.join(tables)}")
    return tables[attribute][value]


def _first(options: Sequence[str]) -> str:
    return options[0]


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def _noun_phrase(obj: ShapeSpec, pick, show_size: bool, form: str) -> tuple[str, str]:
    size = f"{pick(_SIZE_WORDS[obj.size])} " if show_size else ""
    bare = form.format(
        size=size, colour=pick(_COLOUR_WORDS[obj.colour]), shape=pick(_SHAPE_WORDS[obj.shape])
    )
    return f"{_article(bare)} {bare}", bare


def _fill(
    template: str, spec: SceneSpec, pick, show_size: list[bool], show_background: bool
) -> str:
    fields: dict[str, Any] = {}
    form = pick(_NOUN_PHRASES)
    for i, obj in enumerate(spec.objects):
        suffix = "" if len(spec.objects) == 1 else str(i + 1)
        np_, bare = _noun_phrase(obj, pick, show_size[i], form)
        pos = pick(_POSITION_PHRASES[obj.position])
        fields |= {
            f"np{suffix}": np_,
            f"np_bare{suffix}": bare,
            f"pos{suffix}": pos,
            f"Pos{suffix}": pos[:1].upper() + pos[1:],
            f"pos_word{suffix}": pick(_POSITION_WORDS[obj.position]),
        }
    if show_background:
        word = pick(_BACKGROUND_WORDS[spec.background])
        fields["bg"] = pick(_BACKGROUND_PHRASES).format(a=_article(word), word=word)
        fields["bg_np"] = f"{_article(word)} {word} background"
    else:
        fields["bg"] = ""
        fields["bg_np"] = pick(("a picture", "an image", "a scene"))
    return template.format(**fields)
