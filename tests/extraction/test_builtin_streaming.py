"""A built-in's seeded build, streamed: the kept tensors are the plain build's, bit for bit."""

from __future__ import annotations

import pytest
import torch

from fragjobs.builtin.configs import build_tiny_sd
from fragjobs.builtin.pixart import build_tiny_pixart
from fragjobs.builtin.sdxl import build_tiny_sdxl
from fragjobs.builtin.streaming import build_keeping, unet_layout
from fragjobs.errors import FragjobsError
from fragjobs.families import denoiser


@pytest.mark.parametrize(
    "build",
    [build_tiny_sd, build_tiny_sdxl, build_tiny_pixart],
    ids=["tiny-sd", "tiny-sdxl", "tiny-pixart"],
)
def test_streamed_build_keeps_exactly_the_plain_builds_tensors(build):
    plain = build()
    layout = unet_layout(build)
    assert all(p.is_meta for p in layout.skeleton.parameters())
    state = denoiser(plain).state_dict()
    keys = list(state)
    rows = torch.tensor([0, 1, 5])
    # a weight of which some rows are kept (not one of the two kept whole)
    first = next(k for k in keys[2:-1] if state[k].dim() > 1 and state[k].shape[0] > 5)
    wanted = {keys[1]: None, keys[-1]: None, first: (0, rows)}
    pipe, kept = build_keeping(build, layout, wanted)

    assert set(kept) == set(wanted)
    for key in (keys[1], keys[-1]):
        assert torch.equal(kept[key], state[key])
    assert torch.equal(kept[first], state[first][rows])
    assert all(p.is_meta for p in denoiser(pipe).parameters())  # nothing else of it kept
    others = [n for n in ("vae", "text_encoder", "text_encoder_2") if hasattr(plain, n)]
    for name in others:  # the other components are built as usual
        expected = getattr(plain, name).state_dict()
        actual = getattr(pipe, name).state_dict()
        assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_build_that_leaves_its_layout_is_refused():
    layout = unet_layout(build_tiny_sd)
    with pytest.raises(FragjobsError, match="did not follow its recorded layout"):
        build_keeping(lambda: (build_tiny_sd(), build_tiny_sd())[1], layout, {})
