"""Interleaved latency: each pipeline's batches timed in rounds, the order rotating.

Real tiny-sd pipelines (random weights); the order is read from the UNets' own calls."""

from __future__ import annotations

import copy

import pytest

from fragjobs.errors import InvalidInputError
from fragjobs.generation import GenerationConfig, interleaved_latency_ms, with_unet

PROMPT = "a red circle on the left"
GEN = GenerationConfig(steps=2, guidance_scale=5.0, height=64, width=64, batch_size=2)


def test_rounds_interleave_the_pipelines_and_rotate_their_order(tiny_pipe):
    other = with_unet(tiny_pipe, copy.deepcopy(tiny_pipe.unet))
    order = []
    handles = [
        pipe.unet.register_forward_hook(lambda *args, name=name: order.append(name))
        for name, pipe in (("a", tiny_pipe), ("b", other))
    ]
    try:
        timings = interleaved_latency_ms([tiny_pipe, other], PROMPT, GEN, repeats=3)
    finally:
        for handle in handles:
            handle.remove()
    batches = order[:: GEN.steps]  # one UNet call per step and batch
    assert batches == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then rotating rounds
    assert [len(t) for t in timings] == [3, 3]
    assert all(ms > 0 for t in timings for ms in t)


@pytest.mark.parametrize("pipes, repeats", [([], 3), (None, 0), (None, True)])
def test_no_pipeline_or_a_bad_repeat_count_is_refused(tiny_pipe, pipes, repeats):
    with pytest.raises(InvalidInputError, match="pipeline|repeats"):
        interleaved_latency_ms(
            [tiny_pipe] if pipes is None else pipes, PROMPT, GEN, repeats=repeats
        )
