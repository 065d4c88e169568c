"""Submit the chain to the farm, watch its progress, wait for its images (DESIGN §5).

Example::

    from fragjobs.client import Farm

    with Farm() as farm:                      # broker, catalog, store: FRAGJOBS_* variables
        job = farm.submit("a red circle on the left", variants=32)
        job.progress()     # {"state": "PROGRESS", "images_done": 8, "images_total": 32, ...}
        result = job.wait(timeout=600)
        result.image_uris, result.fragment_key, result.job_ids, result.lineage

The canvas is a plain Celery chain whose last element is a group::

    profile | extract | validate | group(generate(seeds 0-3), generate(seeds 4-7), ...)

Each generate batch receives validate's result (``{"key", "passed", ...}``) as its first
argument, so the fan-out needs no chord (and no chord-unlock polling); ``wait`` collects the
batches by their task ids, which are assigned here before anything is sent. When the catalog
already has a ready fragment for the prompt on this model, only the group is sent.

Routing: every task goes to the shared queue ``gpu`` unless ``queue=`` pins the whole job to
one queue (``gpu.<node>.<i>``: one worker). With ``affinity=True`` (the default), the workers
that advertise the fragment warm (:class:`fragjobs.farm.registry.WarmRegistry`), then those that
hold the base model (loaded, or in their node's cache), and reply to ``inspect`` with no
running task and an empty own queue each get one batch on their own queue
(:func:`plan_batch_queues`); the other batches go to the shared queue, where any worker loads
the fragment and the base from the store. The stages (profile, extract, validate) always go
to the shared queue unless ``queue=`` pins them: a stage waiting on the own queue of a node
that is gone would hold up the whole job.

Base models: a built-in, or a base in the shared store — ``store:<sha256>``, the name it was
added under, or the local folder it was added from (``fragjobs models add PATH``; the client
finds it by the folder's sha256 and sends ``store:<sha256>``). A folder that was not added,
or changed since, and a stored base with objects missing are refused before anything is
queued. A batch
sent to a worker's own queue waits for that worker: its pool replaces a killed process, but
a node that is gone for good leaves it queued until it returns.

Everything is validated before anything is queued. Celery is imported lazily; only
:mod:`fragjobs.farm` (and ``tasks/``) know about it. The knobs are the embedded run's
(:class:`~fragjobs.chain.knobs.ChainKnobs`): they travel with the messages to every step.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from fragjobs.base_store import (
    check_pipeline_folder,
    check_stored,
    open_settings_store,
    store_source,
    stored_sha256,
)
from fragjobs.catalog import BaseModelEntity, Catalog, FragmentEntity
from fragjobs.chain.knobs import ChainKnobs
from fragjobs.config import Settings, get_settings
from fragjobs.errors import ConfigError, InvalidInputError, UnknownModelError
from fragjobs.farm.jobs import Batch, FarmJob
from fragjobs.farm.launcher import make_celeryconfig_importable
from fragjobs.farm.registry import BaseHolder, WarmRegistry, WarmWorker
from fragjobs.keys import check_int, check_seeds, normalise_prompt
from fragjobs.library import lookup_prompt
from fragjobs.storage import ObjectStore

log = logging.getLogger("fragjobs.client")

AFFINITY_INSPECT_TIMEOUT_S = 1.0
"""How long routing waits for the warm workers' ``inspect`` replies."""

_QUEUE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def plan_batch_queues(
    count: int, holders: Sequence[WarmWorker | BaseHolder], free: Collection[str]
) -> list[str | None]:
    """The queue of each of ``count`` batches of one fragment.

    Each free holder (``holders`` in order of preference, ``free`` their hostnames that can
    start at once) gets one batch on its own queue; the other batches get None (the shared
    queue), so they start on whichever worker is free instead of waiting for a holder.

    Example::

        plan_batch_queues(3, [WarmWorker("gpu0@n1", "gpu.n1.0", ("k",), 0.0)], {"gpu0@n1"})
        # ["gpu.n1.0", None, None]
    """
    own = [w.queue for w in holders if w.hostname in free and w.queue]
    own = list(dict.fromkeys(own))[:count]
    return [*own, *[None] * (count - len(own))]


class Farm:
    """A handle on the farm given by ``settings`` (default: the environment).

    The Celery app and the catalog are opened on first use; :meth:`close` releases them.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._app: Any = None
        self._catalog: Catalog | None = None
        self._store: ObjectStore | None = None
        self._registry: list[WarmRegistry | None] = []

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the broker connections and the catalog's database connections."""
        if self._app is not None:
            self._app.close()
        if self._catalog is not None:
            self._catalog.dispose()
        if self._registry and self._registry[0] is not None:
            self._registry[0].close()

    @property
    def app(self) -> Any:
        """The Celery app: ``celeryconfig`` with this farm's broker and result backend.

        Raises:
            ConfigError: ``celeryconfig`` cannot be imported.
        """
        if self._app is None:
            from celery import Celery

            make_celeryconfig_importable()
            app = Celery("fragjobs", set_as_current=False)
            try:
                app.config_from_object("celeryconfig")
                app.conf.task_routes  # noqa: B018  (the config module is imported lazily)
            except ImportError as exc:
                raise ConfigError(
                    f"cannot import celeryconfig ({exc}): run from the fragjobs checkout or "
                    "put the folder holding celeryconfig.py on PYTHONPATH"
                ) from exc
            from fragjobs.farm.results import result_backend_url

            app.conf.update(
                broker_url=self.settings.broker_url,
                result_backend=result_backend_url(
                    self.settings.result_backend or self.settings.broker_url
                ),
            )
            self._app = app
        return self._app

    @property
    def catalog(self) -> Catalog:
        """The catalog (the embedded SQLite file is migrated; a server database is checked)."""
        if self._catalog is None:
            self._catalog = Catalog.open_embedded(self.settings)
        return self._catalog

    @property
    def store(self) -> ObjectStore:
        """The shared object store (``FRAGJOBS_STORAGE_URL``)."""
        if self._store is None:
            self._store = open_settings_store(self.settings)
        return self._store

    @property
    def registry(self) -> WarmRegistry | None:
        """The warm-fragment registry in the broker; None when the broker is not Redis."""
        if not self._registry:
            self._registry.append(WarmRegistry.for_broker(self.settings.broker_url))
        return self._registry[0]

    def submit(
        self,
        prompt: str,
        knobs: ChainKnobs | None = None,
        *,
        seeds: list[int] | None = None,
        batch_size: int = 4,
        pipeline_batch_size: int | None = None,
        queue: str | None = None,
        affinity: bool = True,
        **knob_values: Any,
    ) -> FarmJob:
        """Queue the chain for ``prompt``: ``variants`` seeds (or ``seeds``) in batches.

        Args:
            prompt: the text prompt.
            knobs: what to do (:class:`~fragjobs.chain.knobs.ChainKnobs`), or the same knobs
                as keyword arguments (``model=``, ``variants=``, ``threshold=``,
                ``fidelity=``, ``low_rank=``, ``int8=``, ``caching=``, ``paraphrases=``,
                ...); whatever is not given comes from the settings, as for ``fragjobs run``.
                ``model`` is a built-in name or a base added to the shared store
                (``store:<sha256>``, its name, or the folder it was added from).
            seeds: explicit seeds (distinct, non-negative) instead of ``0 .. variants-1``.
            batch_size: seeds per generate task (one catalog job each).
            pipeline_batch_size: images per pipeline call inside a task (the knobs'
                ``batch_size``; default: ``batch_size``); PROGRESS is reported after each.
            queue: send every task to this queue (``gpu.<node>.<i>``: one worker) instead of
                routing them.
            affinity: route batches of a ready fragment to free workers that hold it warm.

        Returns:
            the :class:`FarmJob`, to follow with ``progress()`` and ``wait()``.

        Raises:
            InvalidInputError: a malformed argument; nothing was queued.
            UnknownModelError: ``model`` is neither a built-in nor a base in the store (a
                local folder not added with ``fragjobs models add``); nothing was queued.
            ObjectNotFoundError: the base's objects are missing from the store.
        """
        from celery import chain, group

        normalise_prompt(prompt)
        check_int(batch_size, "batch_size", minimum=1, maximum=1024)
        if pipeline_batch_size is not None:
            check_int(pipeline_batch_size, "pipeline_batch_size", minimum=1, maximum=1024)
            knob_values["batch_size"] = pipeline_batch_size
        elif knobs is None and "batch_size" not in knob_values:
            knob_values["batch_size"] = batch_size
        if seeds is not None:
            seeds = check_seeds(seeds)
            knob_values["variants"] = len(seeds)
        if knobs is None:
            knobs = ChainKnobs.from_settings(self.settings, **knob_values)
        elif knob_values:
            knobs = knobs.replace(**knob_values)
        if not isinstance(affinity, bool):
            raise InvalidInputError(f"affinity must be true or false, got {affinity!r}")
        if queue is not None and not _QUEUE_PATTERN.match(str(queue)):
            raise InvalidInputError(f"queue must be a queue name such as gpu.n1.0, got {queue!r}")
        seeds = seeds if seeds is not None else list(range(knobs.variants))
        knobs = knobs.replace(model=self._check_model(knobs.model))
        model = knobs.model
        message_knobs = knobs.to_json()
        ready = self._ready_fragment(model, prompt)
        app = self.app
        chunks = [tuple(seeds[i : i + batch_size]) for i in range(0, len(seeds), batch_size)]
        if queue is not None:
            queues: list[str | None] = [queue] * len(chunks)
        elif affinity:
            queues = self._affinity_queues(
                ready.key if ready is not None else None, len(chunks), self._base_sha256(model)
            )
        else:
            queues = [None] * len(chunks)
        batches = [
            Batch(str(uuid.uuid4()), uuid.uuid4().hex[:20], chunk, q)
            for chunk, q in zip(chunks, queues, strict=True)
        ]
        upstream = () if ready is None else ({"key": ready.key},)
        key_text = ready.key if ready is not None else "from validate"
        generates = [
            app.signature(
                "fragjobs.generate",
                args=upstream,
                kwargs={
                    "prompt": prompt,
                    "seeds": list(b.seeds),
                    "job_id": b.job_id,
                    "model": model,
                    "batch_size": knobs.batch_size,
                },
                task_id=b.task_id,
                **({"queue": b.queue} if b.queue else {}),
                argsrepr=f"({prompt!r}, key={key_text})",
                kwargsrepr=f"{{seeds {b.seeds[0]}..{b.seeds[-1]} ({len(b.seeds)}), "
                f"job_id={b.job_id!r}}}",
            )
            for b in batches
        ]
        if ready is not None:
            group(generates, app=app).apply_async()
            return FarmJob(self, {}, batches, ready.key)
        stage_ids = {name: str(uuid.uuid4()) for name in ("profile", "extract", "validate")}
        pinned = {"queue": queue} if queue is not None else {}
        stages = [
            app.signature(
                "fragjobs.profile",
                args=(prompt,),
                kwargs={"knobs": message_knobs},
                task_id=stage_ids["profile"],
                argsrepr=repr((prompt,)),
                **pinned,
            ),
            app.signature(
                "fragjobs.extract",
                kwargs={"knobs": message_knobs},
                task_id=stage_ids["extract"],
                argsrepr=f"(profile of {prompt!r})",
                **pinned,
            ),
            app.signature(
                "fragjobs.validate",
                task_id=stage_ids["validate"],
                argsrepr=f"(fragment of {prompt!r})",
                **pinned,
            ),
        ]
        chain(*stages, group(generates, app=app), app=app).apply_async()
        return FarmJob(self, stage_ids, batches, None)

    def _affinity_queues(
        self, key: str | None, count: int, base_sha256: str | None = None
    ) -> list[str | None]:
        """Queues of ``count`` batches: see :func:`plan_batch_queues`. The holders of
        fragment ``key`` come first, then those of base ``base_sha256``.

        A worker counts as free when it replies to ``inspect`` (within
        :data:`AFFINITY_INSPECT_TIMEOUT_S`) with no running task and its own queue is empty.
        Any broker error gives up affinity for this job (every batch to the shared queue).
        """
        shared: list[str | None] = [None] * count
        registry = self.registry
        if registry is None or (key is None and base_sha256 is None):
            return shared
        from kombu.exceptions import KombuError
        from redis.exceptions import RedisError

        try:
            found: list[WarmWorker | BaseHolder] = []
            if key is not None:
                found += registry.holders(key)
            if base_sha256 is not None:
                found += registry.base_holders(base_sha256)
            holders = [w for w in found if w.queue]
            if not holders:
                return shared
            names = list(dict.fromkeys(w.hostname for w in holders))
            inspect = self.app.control.inspect(
                destination=names, timeout=AFFINITY_INSPECT_TIMEOUT_S, limit=len(names)
            )
            active = inspect.active() or {}
            free = {
                w.hostname
                for w in holders
                if w.hostname in active
                and not active[w.hostname]
                and registry.waiting(w.queue) == 0
            }
        except (RedisError, KombuError, OSError) as exc:
            log.warning("fragment affinity unavailable (%s): using the shared queue", exc)
            return shared
        return plan_batch_queues(count, holders, free)

    def _check_model(self, model: Any) -> str:
        """What the workers are sent for ``model``: a built-in's name or ``store:<sha256>``.

        A folder is found by its sha256 (hashing it imports torch; the hash is cached per
        file sizes and times), a stored base's objects must all be in the store.
        """
        from fragjobs.builtin import BUILTINS

        if not isinstance(model, str) or not model.strip():
            raise InvalidInputError(f"model must be a non-empty string, got {model!r}")
        model = model.strip()
        if model in BUILTINS:
            return model
        sha256 = stored_sha256(model)
        if sha256 is None and Path(model).expanduser().is_dir():
            sha256 = self._added_folder(Path(model))
        elif sha256 is None:
            named = [b for b in self._stored_bases() if b.name == model]
            if len(named) != 1:
                raise UnknownModelError(
                    f"unknown model {model!r}: the farm runs a built-in "
                    f"({', '.join(sorted(BUILTINS))}) or a base added to the shared store "
                    f"(fragjobs models add PATH; fragjobs models ls lists them)"
                    + (": several bases have that name, give store:<sha256>" if named else "")
                )
            sha256 = named[0].sha256
        elif sha256 not in {b.sha256 for b in self._stored_bases()}:
            raise UnknownModelError(
                f"no base {sha256[:12]}… was added to the store in this catalog: run "
                "fragjobs models add PATH with its folder"
            )
        check_stored(self.store, sha256)
        return store_source(sha256)

    def _added_folder(self, path: Path) -> str:
        """The sha256 of the local folder ``path`` once it is known to be in the store."""
        folder, name, _ = check_pipeline_folder(path)
        from fragjobs.base_identity import folder_sha256

        sha256 = folder_sha256(folder, name, self.settings)
        if sha256 not in {b.sha256 for b in self._stored_bases()}:
            raise UnknownModelError(
                f"{folder} is a folder on this machine, which the workers cannot read, and no "
                f"base with its content is in the shared store: run fragjobs models add {folder}"
            )
        return sha256

    def _stored_bases(self) -> list[BaseModelEntity]:
        return [b for b in self.catalog.list_base_models() if stored_sha256(b.source)]

    def _base_sha256(self, model: str) -> str | None:
        """The sha256 of ``model`` (as :meth:`_check_model` returns it), when it is known."""
        sha256 = stored_sha256(model)
        if sha256 is not None:
            return sha256
        rows = [b for b in self.catalog.list_base_models() if b.source == f"builtin:{model}"]
        return rows[0].sha256 if len(rows) == 1 else None

    def _ready_fragment(self, model: str, prompt: str) -> FragmentEntity | None:
        """The ready fragment made for ``prompt`` on ``model``, if the catalog has one.

        A stored base (``store:<sha256>``) is found by its sha256. A built-in is matched by
        name, since the client does not load it; when several bases share that name it does
        not guess and the full chain runs (its steps reuse whatever is already stored). The
        worker still checks the fragment's base sha256 and falls back if it differs.
        """
        sha256 = stored_sha256(model)
        if sha256 is not None:
            row = self.catalog.find_base_model(sha256)
            return None if row is None else lookup_prompt(self.catalog, row.id, prompt)
        name = model
        base_ids = {f.base_model_id for f in self.catalog.list_fragments(status="ready")}
        matching = [i for i in sorted(base_ids) if self.catalog.get_base_model(i).name == name]
        if len(matching) != 1:
            return None
        return lookup_prompt(self.catalog, matching[0], prompt)
