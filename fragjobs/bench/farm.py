"""Farm benchmark: ``python -m fragjobs.bench.farm`` (DESIGN §5, §7).

Measured in one run on this machine, ratios printed next to the issue's targets:

1. **the chain in-process vs through the farm**: the same chain (profile → extract →
   validate → generate ``--variants`` images in batches of ``--batch-size``) with the same
   defaults, on the same kind of catalog and store (a fresh SQLite file and local folder for
   each side), with :mod:`fragjobs.chain` in this process and with
   :meth:`fragjobs.client.Farm.submit` + ``wait`` on one worker (``fragjobs farm start
   --cpu-workers 1``). Both are warm (the model is loaded by a throwaway generation first)
   and use ``--threads`` CPU threads; ``--rounds`` prompts, run interleaved (see
   :func:`run`). Target: farm / in-process (sums) ≤ 1.10.
2. **dispatch latency** of ``fragjobs.fragment_status`` (a catalog read, no model): from
   ``send_task`` to the worker starting it (same clock), and the full round trip to the
   result; medians over ``--repeats``. Target: ≤ 50 ms.
3. **fragment load** (:func:`fragjobs.chain.load_stored_fragment`: catalog row, manifest,
   file, hashes, parse; :mod:`fragjobs.bench.fragment_loads`) from a local folder, from S3
   (moto's standalone server over HTTP, in a process of its own) with a cold node cache, and
   from the warm node cache; medians over ``--load-repeats``. Targets: S3 / local ≤ 1.5,
   warm cache / local ≈ 1.0. The tiny-sd fragment is about 1 MB, so its S3 time is mostly
   per-request overhead; the same three reads of a ``--blob-mib`` object (sha256 checked)
   show the size-bound case.

Needs the Redis server (``--redis-host``/``--redis-port``; an empty database is claimed and
flushed afterwards) and moto[server] for 3. Every process, folder and database it makes is
removed at the end. ``--out`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fragjobs.bench.fragment_loads import fragment_loads
from fragjobs.bench.loading import embedded_settings
from fragjobs.bench.timing import median_ms
from fragjobs.farm import farm_env, scratch_redis_database

TARGETS = {"farm_ratio": 1.10, "dispatch_ms": 50.0, "s3_ratio": 1.5, "warm_ratio": 1.0}
_WARM_UP_PROMPT = "a grey background"


@contextlib.contextmanager
def one_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """``fragjobs farm start --cpu-workers 1`` in its own process group, stopped afterwards."""
    command = [sys.executable, "-m", "fragjobs.cli", "farm", "start", "--cpu-workers", "1"]
    with log_path.open("ab") as log:
        launcher = subprocess.Popen(
            [*command, "--node", "bench", "--loglevel", "warning"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield launcher
    finally:
        with contextlib.suppress(ProcessLookupError):
            launcher.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def _wait_for_worker(app: Any, launcher: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise RuntimeError(f"the worker exited: {log_path.read_text()[-2000:]}")
        if app.control.inspect(timeout=1).ping():
            return
        time.sleep(0.5)
    raise RuntimeError("the worker did not answer within 180 s")


class InProcess:
    """The chain with :mod:`fragjobs.chain` in this process, on its own embedded workspace."""

    name = "in-process"

    def __init__(self, data_dir: Path, model: str, variants: int, batch_size: int) -> None:
        from fragjobs import chain

        self.chain, self.model, self.variants, self.batch_size = chain, model, variants, batch_size
        self.ws = chain.Workspace.open(embedded_settings(data_dir))

    def warm_up(self) -> None:
        """Load the model (a throwaway generation)."""
        self.chain.generate(
            _WARM_UP_PROMPT, seeds=[0], model=self.model, ws=self.ws, progress=False
        )

    def run_chain(self, prompt: str) -> tuple[float, str]:
        """Seconds for profile → extract → validate → generate in batches; the fragment key."""
        chain, ws, model = self.chain, self.ws, self.model
        started = time.perf_counter()
        prof = chain.profile(prompt, model=model, ws=ws, progress=False)
        ext = chain.extract(prof.profile_id, chain.extraction_config(0.75), ws=ws, model=model)
        chain.validate(ext.key, ws=ws, progress=False)
        seeds = list(range(self.variants))
        for start in range(0, self.variants, self.batch_size):
            chain.generate(
                prompt,
                seeds=seeds[start : start + self.batch_size],
                model=model,
                key=ext.key,
                batch_size=self.batch_size,
                ws=ws,
                progress=False,
            )
        return time.perf_counter() - started, ext.key

    def close(self) -> None:
        self.ws.close()


class OnTheFarm:
    """The chain through :class:`fragjobs.client.Farm` and one worker of its own."""

    name = "farm"

    def __init__(
        self,
        data_dir: Path,
        broker_url: str,
        threads: int,
        model: str,
        variants: int,
        batch_size: int,
        stack: contextlib.ExitStack,
    ) -> None:
        from fragjobs.client import Farm

        self.model, self.variants, self.batch_size = model, variants, batch_size
        env = farm_env(
            {k: v for k, v in os.environ.items() if not k.startswith("FRAGJOBS_")}
            | {
                "FRAGJOBS_DATA_DIR": str(data_dir),
                "FRAGJOBS_BROKER_URL": broker_url,
                "FRAGJOBS_DEVICE": os.environ.get("FRAGJOBS_DEVICE", "auto"),
                "OMP_NUM_THREADS": str(threads),
                "DIFFUSERS_VERBOSITY": "error",
                "TRANSFORMERS_VERBOSITY": "error",
            }
        )
        settings = embedded_settings(data_dir, broker_url=broker_url, result_backend=broker_url)
        log_path = data_dir.parent / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        launcher = stack.enter_context(one_worker(env, log_path))
        self.farm = stack.enter_context(Farm(settings))
        _wait_for_worker(self.farm.app, launcher, log_path)

    def warm_up(self) -> None:
        """Load the model in the worker (a throwaway generate task)."""
        kwargs = {"prompt": _WARM_UP_PROMPT, "seeds": [0], "model": self.model}
        self.farm.app.send_task(
            "fragjobs.generate", kwargs={**kwargs, "job_id": uuid.uuid4().hex[:20]}
        ).get(timeout=300)

    def run_chain(self, prompt: str) -> tuple[float, str]:
        """Seconds from submit to every image done; the fragment key."""
        started = time.perf_counter()
        job = self.farm.submit(
            prompt, variants=self.variants, model=self.model, batch_size=self.batch_size
        )
        result = job.wait(timeout=1800)
        return time.perf_counter() - started, result.lineage["fragment_key"]

    def dispatch_latency(self, key: str, repeats: int) -> tuple[float, float]:
        """Median ms of ``fragjobs.fragment_status``: send → start, and send → result."""
        dispatch, round_trip = [], []
        for attempt in range(repeats + 3):
            sent = time.time()
            out = self.farm.app.send_task("fragjobs.fragment_status", args=(key,)).get(timeout=30)
            done = time.time()
            if attempt >= 3:  # the first ones open connections
                dispatch.append(out["checked_at"] - sent)
                round_trip.append(done - sent)
        return median_ms(dispatch), median_ms(round_trip)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; return the figures (see the module doc).

    The two sides of the chain comparison run interleaved (in-process, farm, farm,
    in-process, ...; one fresh prompt per round, the same prompts on both sides), both warm,
    so that a change in the machine's background load hits both alike.
    """
    import torch

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="fragjobs-bench-farm-"))
    prompts = [args.prompt] + [f"{args.prompt}, take {i + 2}" for i in range(args.rounds - 1)]
    seconds: dict[str, list[float]] = {"in-process": [], "farm": []}
    try:
        with contextlib.ExitStack() as stack:
            broker_url = stack.enter_context(
                scratch_redis_database(args.redis_host, args.redis_port)
            )
            local = InProcess(root / "inproc" / "data", args.model, args.variants, args.batch_size)
            stack.callback(local.close)
            farm = OnTheFarm(
                root / "farm" / "data",
                broker_url,
                args.threads,
                args.model,
                args.variants,
                args.batch_size,
                stack,
            )
            local.warm_up()
            farm.warm_up()
            keys: dict[str, str] = {}
            for i, prompt in enumerate(prompts):
                for side in (local, farm) if i % 2 == 0 else (farm, local):
                    elapsed, keys[side.name] = side.run_chain(prompt)
                    seconds[side.name].append(elapsed)
            dispatch_ms, round_trip_ms = farm.dispatch_latency(keys["farm"], args.repeats)
        loads = fragment_loads(
            root / "inproc" / "data", keys["in-process"], args.load_repeats, args.blob_mib
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    in_process_s, farm_s = sum(seconds["in-process"]), sum(seconds["farm"])
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "model": args.model,
        "variants": args.variants,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "chain_in_process_s": [round(x, 3) for x in seconds["in-process"]],
        "chain_farm_s": [round(x, 3) for x in seconds["farm"]],
        "farm_ratio": round(farm_s / in_process_s, 3),
        "dispatch_ms": dispatch_ms,
        "round_trip_ms": round_trip_ms,
        "fragment_bytes": loads["bytes"],
        "load_local_ms": loads["local_ms"],
        "load_s3_ms": loads["s3_ms"],
        "load_warm_ms": loads["warm_ms"],
        "s3_ratio": round(loads["s3_ms"] / loads["local_ms"], 3),
        "warm_ratio": round(loads["warm_ms"] / loads["local_ms"], 3),
        "blob_bytes": loads["blob_bytes"],
        "blob_local_ms": loads["blob_local_ms"],
        "blob_s3_ms": loads["blob_s3_ms"],
        "blob_warm_ms": loads["blob_warm_ms"],
        "blob_s3_ratio": round(loads["blob_s3_ms"] / loads["blob_local_ms"], 3),
        "blob_warm_ratio": round(loads["blob_warm_ms"] / loads["blob_local_ms"], 3),
        "targets": TARGETS,
    }


def report(figures: dict[str, Any]) -> str:
    """The figures as a small table, each ratio next to its target."""
    f, t = figures, figures["targets"]
    return "\n".join(
        [
            f"fragjobs farm benchmark: {f['model']}, {f['variants']} variants in batches of "
            f"{f['batch_size']}; {f['machine']}, {f['threads']} thread(s)",
            f"  chain in-process            {sum(f['chain_in_process_s']):9.2f} s   "
            f"rounds {f['chain_in_process_s']}",
            f"  chain through the farm      {sum(f['chain_farm_s']):9.2f} s   "
            f"rounds {f['chain_farm_s']}",
            f"  farm / in-process           {f['farm_ratio']:9.3f}     "
            f"(target <= {t['farm_ratio']})",
            f"  dispatch latency (median)   {f['dispatch_ms']:9.2f} ms  "
            f"send -> worker starts  (target <= {t['dispatch_ms']} ms)",
            f"  round trip (median)         {f['round_trip_ms']:9.2f} ms  send -> result",
            f"  fragment load, local        {f['load_local_ms']:9.2f} ms  "
            f"({f['fragment_bytes']} B fragment file)",
            f"  fragment load, S3 (cold)    {f['load_s3_ms']:9.2f} ms  "
            f"ratio {f['s3_ratio']:.3f}  (target <= {t['s3_ratio']})",
            f"  fragment load, warm cache   {f['load_warm_ms']:9.2f} ms  "
            f"ratio {f['warm_ratio']:.3f}  (target ~ {t['warm_ratio']})",
            f"  {f['blob_bytes'] >> 20} MiB object, local      {f['blob_local_ms']:9.2f} ms",
            f"  {f['blob_bytes'] >> 20} MiB object, S3 (cold)  {f['blob_s3_ms']:9.2f} ms  "
            f"ratio {f['blob_s3_ratio']:.3f}  (target <= {t['s3_ratio']})",
            f"  {f['blob_bytes'] >> 20} MiB object, warm cache {f['blob_warm_ms']:9.2f} ms  "
            f"ratio {f['blob_warm_ratio']:.3f}  (target ~ {t['warm_ratio']})",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the benchmark, print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(prog="python -m fragjobs.bench.farm", description=__doc__)
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for each side.")
    parser.add_argument("--rounds", type=int, default=2, help="Chains per side (interleaved).")
    parser.add_argument("--repeats", type=int, default=30, help="Dispatch latency samples.")
    parser.add_argument("--load-repeats", type=int, default=15, help="Fragment load samples.")
    parser.add_argument("--blob-mib", type=int, default=64, help="Size of the large object.")
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument("--out", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args(argv)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    figures = run(args)
    print(report(figures))
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
