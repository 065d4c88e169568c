"""``profiling_raw.parquet``: the raw statistics a profile's head scores came from.

One row per measured value, in long form:

* ``statistic``: ``energy`` (a head's share of its module's ``to_out`` output energy),
  ``entropy`` and ``prompt_mass`` (cross-attention, conditional pass), ``block_change``
  (relative change of a UNet block's output from the previous step), ``block_time_ms`` (mean
  time of a block call);
* ``module``: attention module or UNet block; ``kind``: ``self`` / ``cross`` for heads,
  ``block`` for blocks; ``head``: head index (null for blocks);
* ``step``: denoising step (``block_change``: the step whose output is compared with the
  previous one); null for head statistics, which the profiling hooks accumulate over the
  sampled steps (``sampled_steps`` in the file's metadata), and for block times;
* ``seed``: profiling seed (null for block times, measured over all seeds at once);
* ``value``: the value.

A head's score is its ``energy`` divided by its module's mean, averaged over seeds
(:meth:`~fragjobs.profiling.PromptProfile.head_scores`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fragjobs.profiling import PromptProfile

COLUMNS = ("statistic", "module", "kind", "head", "step", "seed", "value")


def profiling_rows(profile: PromptProfile) -> dict[str, list[Any]]:
    """The table's columns (see module), one list per column."""
    table: dict[str, list[Any]] = {name: [] for name in COLUMNS}

    def add(statistic, module, kind, head, step, seed, value) -> None:
        for name, item in zip(
            COLUMNS, (statistic, module, kind, head, step, seed, float(value)), strict=True
        ):
            table[name].append(item)

    seeds = list(profile.config.seeds)
    for statistic, source in (
        ("energy", profile.energy),
        ("entropy", profile.entropy),
        ("prompt_mass", profile.prompt_mass),
    ):
        for module in sorted(source):
            values = source[module].tolist()  # (seeds, heads)
            for seed, row in zip(seeds, values, strict=True):
                for head, value in enumerate(row):
                    add(statistic, module, profile.head_kind[module], head, None, seed, value)
    for block in sorted(profile.block_change):
        values = profile.block_change[block].tolist()  # (seeds, steps - 1)
        for seed, row in zip(seeds, values, strict=True):
            for i, value in enumerate(row):
                add("block_change", block, "block", None, i + 1, seed, value)
    for block, value in sorted(profile.layer_time_ms.items()):
        add("block_time_ms", block, "block", None, None, None, value)
    return table


def write_profiling_raw(profile: PromptProfile, path: Path, *, profile_id: str | None) -> Path:
    """Write ``profile``'s raw statistics to ``path`` as Parquet (pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = profiling_rows(profile)
    schema = pa.schema(
        [
            ("statistic", pa.string()),
            ("module", pa.string()),
            ("kind", pa.string()),
            ("head", pa.int32()),
            ("step", pa.int32()),
            ("seed", pa.int64()),
            ("value", pa.float64()),
        ],
        metadata={
            "fragjobs.profile_id": profile_id or "",
            "fragjobs.prompt": profile.prompt,
            "fragjobs.steps": str(profile.config.steps),
            "fragjobs.sampled_steps": json.dumps(profile.config.sampled_steps()),
            "fragjobs.seeds": json.dumps(list(profile.config.seeds)),
            "fragjobs.note": "head statistics (energy, entropy, prompt_mass) are accumulated "
            "over the sampled steps by the profiling hooks: their step is null",
        },
    )
    table = pa.Table.from_pydict(columns, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
