"""Memory one benchmark method holds, measured in a process of its own.

``python -m fragjobs.bench.memory --model M [--fragment DIR | --peer NAME]`` is the probe of
:mod:`fragjobs.generation.memory_probe` (load the base, a fragment on it or a peer; one
batch, print one JSON object: ``rss_held_bytes``, ``rss_peak_bytes``, ``unet_bytes``,
``cuda_max_allocated_bytes``, ``cuda_batch_max_allocated_bytes``) with the benchmark's peer
methods (DeepCache, ToMe) added. :func:`measure` runs it in a subprocess, so that each
method's figures are its own and not those of a process holding every other method as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fragjobs.generation import memory_probe

PROBE_TIMEOUT_S = memory_probe.PROBE_TIMEOUT_S


def measure(
    model: str,
    *,
    prompt: str,
    steps: int,
    size: int | None,
    batch_size: int,
    fragment_dir: Path | None = None,
    peer: str | None = None,
    data_dir: Path | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> dict[str, Any]:
    """Run the probe in a fresh Python process; its JSON result.

    ``data_dir``: a data folder whose base-hash cache the probe uses (default: a throwaway
    one, so a built-in's id is computed anew, by a process of its own for a fragment).

    Raises:
        FragjobsError: the probe failed (its stderr's last lines are in the message).
    """
    command = memory_probe.probe_command(
        model,
        prompt=prompt,
        steps=steps,
        size=size,
        batch_size=batch_size,
        fragment_dir=fragment_dir,
        data_dir=data_dir,
        module="fragjobs.bench.memory",
    )
    if peer is not None:
        command += ["--peer", peer]
    return memory_probe.measure(
        model,
        prompt=prompt,
        steps=steps,
        size=size,
        batch_size=batch_size,
        timeout_s=timeout_s,
        command=command,
    )


def main(argv: list[str] | None = None) -> int:
    parser = memory_probe.parser(prog="python -m fragjobs.bench.memory")
    parser.add_argument("--peer", default=None, help="deepcache_3, deepcache_5, tome_0.5, ...")
    args = parser.parse_args(argv)
    if args.peer is not None and args.fragment is not None:
        parser.error("--fragment and --peer are exclusive")
    wrap = None
    if args.peer is not None:
        from fragjobs.bench.loading import peer_pipeline

        def wrap(pipe: Any) -> Any:
            return peer_pipeline(pipe, args.peer)

    return memory_probe.run_from_args(args, wrap=wrap)


if __name__ == "__main__":
    raise SystemExit(main())
