"""Procedural 64×64 scenes with captions: the training data of fragjobs' own small model.

A scene is a flat background colour with one shape on it (sometimes two, side by side). Each
shape has a named colour, a kind, a size and a position; a little jitter (offset, scale,
rotation, shade) makes every rendering different while the named attributes stay exact.

* :class:`SceneSpec` holds one scene's attributes; :func:`sample_specs` draws them from a seeded
  ``torch.Generator`` and :func:`enumerate_specs` lists every single-shape combination.
* :func:`render` rasterises specs with torch ops on a pixel grid (signed distances, 1-pixel
  antialiasing), so whole batches are drawn at once on any device; training draws
  :class:`SceneTensors` directly and calls :func:`render_tensors`.
* :data:`HELD_OUT` names colour/shape/position combinations that training never sees; they are
  used only to test whether a model composes attributes it learnt separately.
* Captions are in :mod:`fragjobs.builtin.captions`; reading the attributes back from images
  with a CLIP model is :mod:`fragjobs.builtin.reading`.

Example::

    g = torch.Generator().manual_seed(0)
    specs = sample_specs(8, g, held_out=False)
    images = render(specs)                   # (8, 3, 64, 64) in [0, 1]
    texts = [captions.caption(s, random.Random(0)) for s in specs]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

IMAGE_SIZE = 64
MAX_CAPTION_BYTES = 75  # 77 positions minus the start and end tokens of the byte tokenizer

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "pink": (245, 175, 195),
    "teal": (20, 125, 130),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTES = ("colour", "shape", "size", "position", "background")

# Two shapes always stand on opposite sides, so that they never cover each other.
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))

HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "star", "left"),
        ("green", "triangle", "right"),
        ("blue", "circle", "top"),
        ("yellow", "cross", "bottom"),
        ("purple", "square", "center"),
        ("orange", "circle", "bottom"),
        ("white", "star", "right"),
        ("black", "square", "top"),
        ("red", "triangle", "center"),
        ("blue", "cross", "left"),
    }
)
"""(colour, shape, position) combinations excluded from training, used only for evaluation.

Every colour, shape and position is still trained in other combinations; each shape and each
position is held out twice. Size and background are free, so a held-out combination is tested
small and large on every background.
"""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CENTRES = {"left": (18.0, 32.0), "right": (46.0, 32.0), "top": (32.0, 18.0)}
_CENTRES |= {"bottom": (32.0, 46.0), "center": (32.0, 32.0)}
_RADIUS = {"small": 8.0, "large": 13.0}
_MAX_OFFSET = 2.0  # pixels
_SCALE_RANGE = (0.92, 1.08)
_MAX_ROTATION = 12.0  # degrees
_SHADE_RANGE = (0.9, 1.1)
_JITTER_FIELDS = 5  # dx, dy, scale, rotation, shade


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene: named attributes and the jitter it is drawn with.

    Attributes:
        shape, colour, size, position: names from :data:`SHAPES`, :data:`COLOURS`,
            :data:`SIZES` and :data:`POSITIONS`.
        dx, dy: offset of the centre, in pixels.
        scale: factor on the size's radius.
        rotation: degrees, counter-clockwise (no visible effect on a circle).
        shade: factor on the colour's RGB value.
    """

    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0
    shade: float = 1.0

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOURS, "colour"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")

    @property
    def triple(self) -> tuple[str, str, str]:
        """The (colour, shape, position) combination, as listed in :data:`HELD_OUT`."""
        return (self.colour, self.shape, self.position)


@dataclass(frozen=True)
class SceneSpec:
    """A scene: a background colour and one or two shapes (drawn in order).

    The single-shape accessors (``colour``, ``shape``, ``size``, ``position``) describe the
    first shape.
    """

    background: str
    objects: tuple[ShapeSpec, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}: choose one of {', '.join(BACKGROUNDS)}"
            )
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has one or two shapes, got {len(self.objects)}")
        for obj in self.objects:
            if obj.colour == self.background:
                raise ValueError(f"a {obj.colour} shape is invisible on a {obj.colour} background")
        if len(self.objects) == 2:
            pair = (self.objects[0].position, self.objects[1].position)
            if pair not in PAIRS:
                raise ValueError(f"two shapes must stand on opposite sides, got {pair}")

    @property
    def colour(self) -> str:
        """Colour of the first shape."""
        return self.objects[0].colour

    @property
    def shape(self) -> str:
        """Kind of the first shape."""
        return self.objects[0].shape

    @property
    def size(self) -> str:
        """Size of the first shape."""
        return self.objects[0].size

    @property
    def position(self) -> str:
        """Position of the first shape."""
        return self.objects[0].position

    def attributes(self) -> dict[str, str]:
        """The named attributes of the first shape and the background (see :data:`ATTRIBUTES`)."""
        first = self.objects[0]
        return {
            "colour": first.colour,
            "shape": first.shape,
            "size": first.size,
            "position": first.position,
            "background": self.background,
        }


def is_held_out(spec: SceneSpec) -> bool:
    """Whether any shape of ``spec`` has a (colour, shape, position) in :data:`HELD_OUT`."""
    return any(obj.triple in HELD_OUT for obj in spec.objects)


# --------------------------------------------------------------------------------------------
# Sampling


def enumerate_specs(*, held_out: bool | None) -> list[SceneSpec]:
    """Every single-shape scene without jitter, in a fixed order.

    Args:
        held_out: ``False`` for training combinations only, ``True`` for :data:`HELD_OUT`
            combinations only, ``None`` for all.

    Returns:
        One spec per (background, colour, shape, size, position) whose colour differs from
        the background.
    """
    return [
        SceneSpec(background, (ShapeSpec(shape, colour, size, position),))
        for background in BACKGROUNDS
        for colour in COLOURS
        for shape in SHAPES
        for size in SIZES
        for position in POSITIONS
        if colour != background and _keep((colour, shape, position), held_out)
    ]


def sample_specs(
    n: int,
    generator: torch.Generator,
    *,
    held_out: bool | None,
    two_shapes: float = 0.0,
    jitter: bool = True,
) -> list[SceneSpec]:
    """Draw ``n`` scenes; the same generator state always gives the same scenes.

    Args:
        n: number of scenes.
        generator: a CPU ``torch.Generator``; it is advanced.
        held_out: ``False`` to exclude every :data:`HELD_OUT` combination (training),
            ``True`` for held-out single-shape scenes only (evaluation), ``None`` for any.
        two_shapes: probability that a scene has two shapes (ignored when ``held_out`` is
            ``True``).
        jitter: draw offset, scale, rotation and shade; ``False`` gives exact placements.

    Returns:
        ``n`` specs; single-shape combinations are uniform over :func:`enumerate_specs`.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= two_shapes <= 1.0:
        raise ValueError(f"two_shapes is a probability, got {two_shapes}")
    singles = enumerate_specs(held_out=held_out)
    draws = torch.rand(n, 4 + 2 * _JITTER_FIELDS, generator=generator, dtype=torch.float64)
    jitters = jitter_from_uniform(draws[:, 4:].reshape(n, 2, _JITTER_FIELDS).float())
    specs = []
    for row, jit in zip(draws.tolist(), jitters.tolist(), strict=True):
        if held_out is not True and row[0] < two_shapes:
            base = _two_shape_spec(row[1:4], held_out)
        else:
            base = singles[min(int(row[1] * len(singles)), len(singles) - 1)]
        objects = tuple(
            _with_jitter(obj, values) if jitter else obj
            for obj, values in zip(base.objects, jit, strict=False)
        )
        specs.append(SceneSpec(base.background, objects))
    return specs


def jitter_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Map uniform draws in [0, 1) (…, 5) to jitter values (dx, dy, scale, rotation°, shade).

    Shared by :func:`sample_specs` and training code that draws jitter on the GPU, so both
    see the same distribution.
    """
    tables = lookup_tables(u.device)
    low, high = tables["jitter_low"].to(u.dtype), tables["jitter_high"].to(u.dtype)
    return low + (high - low) * u


def _keep(triple: tuple[str, str, str], held_out: bool | None) -> bool:
    return held_out is None or (triple in HELD_OUT) == held_out


@cache
def _pair_candidates(
    background: str, position: str, held_out: bool | None
) -> tuple[tuple[str, str, str], ...]:
    return tuple(
        (colour, shape, size)
        for colour in COLOURS
        for shape in SHAPES
        for size in SIZES
        if colour != background and _keep((colour, shape, position), held_out)
    )


def _two_shape_spec(u: Sequence[float], held_out: bool | None) -> SceneSpec:
    """A two-shape scene from three uniforms; with held_out=False no shape is held out."""
    background = list(BACKGROUNDS)[int(u[0] * len(BACKGROUNDS))]
    positions = PAIRS[int(u[1] * len(PAIRS))]
    objects = []
    draw = u[2]
    for position in positions:
        candidates = _pair_candidates(background, position, held_out)
        draw *= len(candidates)
        index = min(int(draw), len(candidates) - 1)
        draw -= index  # the fractional rest is a fresh uniform for the second shape
        colour, shape, size = candidates[index]
        objects.append(ShapeSpec(shape, colour, size, position))
    return SceneSpec(background, tuple(objects))


def _with_jitter(obj: ShapeSpec, values: Sequence[float]) -> ShapeSpec:
    dx, dy, scale, rotation, shade = values
    return ShapeSpec(obj.shape, obj.colour, obj.size, obj.position, dx, dy, scale, rotation, shade)


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass
class SceneTensors:
    """A batch of scenes as tensors, the form :func:`render_tensors` draws.

    Attributes:
        background: (n,) index into :data:`BACKGROUNDS`.
        objects: (n, 2, 4) indices (colour, shape, size, position); an absent second shape
            has colour index -1.
        jitter: (n, 2, 5) float (dx, dy, scale, rotation°, shade).
    """

    background: torch.Tensor
    objects: torch.Tensor
    jitter: torch.Tensor


def specs_to_tensors(
    specs: Sequence[SceneSpec], device: torch.device | str = "cpu"
) -> SceneTensors:
    """Pack specs into a :class:`SceneTensors` batch on ``device``."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    background = [backgrounds.index(s.background) for s in specs]
    objects, jitter = [], []
    for spec in specs:
        rows, jit = [], []
        for obj in spec.objects:
            rows.append(
                [
                    colours.index(obj.colour),
                    SHAPES.index(obj.shape),
                    SIZES.index(obj.size),
                    POSITIONS.index(obj.position),
                ]
            )
            jit.append([obj.dx, obj.dy, obj.scale, obj.rotation, obj.shade])
        while len(rows) < 2:
            rows.append([-1, 0, 0, 0])
            jit.append([0.0, 0.0, 1.0, 0.0, 1.0])
        objects.append(rows)
        jitter.append(jit)
    n = len(specs)
    return SceneTensors(
        background=torch.tensor(background, dtype=torch.long, device=device).reshape(n),
        objects=torch.tensor(objects, dtype=torch.long, device=device).reshape(n, 2, 4),
        jitter=torch.tensor(jitter, dtype=torch.float32, device=device).reshape(n, 2, 5),
    )


def render(specs: Sequence[SceneSpec], device: torch.device | str = "cpu") -> torch.Tensor:
    """Rasterise scenes.

    Returns:
        Float tensor (n, 3, 64, 64) in [0, 1] on ``device``.
    """
    return render_tensors(specs_to_tensors(specs, device))


def render_tensors(scenes: SceneTensors) -> torch.Tensor:
    """Rasterise a :class:`SceneTensors` batch with vectorised torch ops (no Python per image).

    Each shape is a signed distance field evaluated on the pixel centres; coverage is
    ``clamp(0.5 - distance, 0, 1)``, a one-pixel antialiased edge.

    Returns:
        Float tensor (n, 3, 64, 64) in [0, 1] on the batch's device.
    """
    device = scenes.background.device
    n = scenes.background.shape[0]
    palette = lookup_tables(device)
    image = palette["background"][scenes.background][:, :, None, None].expand(n, 3, 64, 64)
    coords = torch.arange(IMAGE_SIZE, device=device, dtype=torch.float32) + 0.5
    for k in range(scenes.objects.shape[1]):
        colour, shape, size, position = scenes.objects[:, k].unbind(-1)
        dx, dy, scale, rotation, shade = scenes.jitter[:, k].unbind(-1)
        present = colour >= 0
        centre = palette["centres"][position]
        radius = palette["radius"][size] * scale
        px = coords[None, None, :] - (centre[:, 0] + dx)[:, None, None]
        py = coords[None, :, None] - (centre[:, 1] + dy)[:, None, None]
        angle = torch.deg2rad(rotation)[:, None, None]
        cos, sin = torch.cos(angle), torch.sin(angle)
        r = radius[:, None, None]
        # Unit coordinates of the shape, y pointing up (image rows grow downwards).
        x = (cos * px - sin * py) / r
        y = -(sin * px + cos * py) / r
        distance = _unit_sdf(x, y, shape) * r
        coverage = (0.5 - distance).clamp(0.0, 1.0) * present[:, None, None]
        rgb = (palette["colour"][colour.clamp(min=0)] * shade[:, None]).clamp(0.0, 1.0)
        image = image + coverage[:, None] * (rgb[:, :, None, None] - image)
    return image.contiguous()


_TABLES: dict[str, dict[str, torch.Tensor]] = {}


def lookup_tables(device: torch.device | str) -> dict[str, torch.Tensor]:
    """Constant lookup tables on ``device``, made once: a copy from a Python list to a GPU
    waits for the GPU, which would stall a training loop on every step."""
    key = str(torch.device(device))
    if key not in _TABLES:

        def table(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        _TABLES[key] = {
            "colour": table(list(COLOURS.values())) / 255.0,
            "background": table(list(BACKGROUNDS.values())) / 255.0,
            "centres": table([_CENTRES[p] for p in POSITIONS]),
            "radius": table([_RADIUS[s] for s in SIZES]),
            "jitter_low": table(
                [-_MAX_OFFSET, -_MAX_OFFSET, _SCALE_RANGE[0], -_MAX_ROTATION, _SHADE_RANGE[0]]
            ),
            "jitter_high": table(
                [_MAX_OFFSET, _MAX_OFFSET, _SCALE_RANGE[1], _MAX_ROTATION, _SHADE_RANGE[1]]
            ),
            "clip_mean": table(CLIP_MEAN)[:, None, None],
            "clip_std": table(CLIP_STD)[:, None, None],
        }
    return _TABLES[key]


def _unit_sdf(x: torch.Tensor, y: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Signed distance (in radii) to the selected shape; sizes chosen to look equally big."""
    fields = torch.stack(
        [
            torch.hypot(x, y) - 1.0,
            _sdf_box(x, y, 0.88, 0.88),
            _sdf_triangle(x, y, 1.4 * math.sqrt(3.0) / 2.0),
            _sdf_star(x, y, 1.3, 0.5),
            torch.minimum(_sdf_box(x, y, 1.05, 0.36), _sdf_box(x, y, 0.36, 1.05)),
        ]
    )
    index = shape.view(1, -1, 1, 1).expand(1, *x.shape)
    return fields.gather(0, index).squeeze(0)


def _sdf_box(x: torch.Tensor, y: torch.Tensor, half_w: float, half_h: float) -> torch.Tensor:
    qx, qy = x.abs() - half_w, y.abs() - half_h
    outside = torch.hypot(qx.clamp(min=0.0), qy.clamp(min=0.0))
    return outside + torch.maximum(qx, qy).clamp(max=0.0)


def _sdf_triangle(x: torch.Tensor, y: torch.Tensor, half_side: float) -> torch.Tensor:
    """Equilateral triangle, apex up, centroid at the origin (after Inigo Quilez)."""
    k = math.sqrt(3.0)
    px = x.abs() - half_side
    py = y + half_side / k
    fold = px + k * py > 0.0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - px.clamp(-2.0 * half_side, 0.0)
    return -torch.hypot(px, py) * torch.sign(py)


def _sdf_star(x: torch.Tensor, y: torch.Tensor, radius: float, inner: float) -> torch.Tensor:
    """Five-pointed star, one point up (after Inigo Quilez's sdStar5)."""
    k1x, k1y = 0.809016994375, -0.587785252292
    px, py = x.abs(), y
    for kx, ky in ((k1x, k1y), (-k1x, k1y)):
        d = (kx * px + ky * py).clamp(min=0.0) * 2.0
        px, py = px - d * kx, py - d * ky
    px = px.abs()
    py = py - radius
    bax, bay = inner * -k1y, inner * k1x - 1.0
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0.0, radius)
    return torch.hypot(px - bax * h, py - bay * h) * torch.sign(py * bax - px * bay)
