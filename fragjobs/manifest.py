"""Fragment manifest, schema v1 (DESIGN §3).

The eight layers of the seed — ``base_model``, ``profiling``, ``pruning``, ``compression``,
``quality``, ``performance``, ``reuse``, ``artifacts`` — plus ``dynamic_routing`` (the block
caching schedule) and ``verified``. ``to_json`` is deterministic (sorted keys, fixed
indentation): the same inputs give byte-identical JSON except ``created_at`` and the
``performance.measured_*`` timings.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    computed_field,
    field_validator,
    model_serializer,
    model_validator,
)

from fragjobs.errors import FragmentIntegrityError, ManifestError
from fragjobs.keys import FRAGMENT_FILE, sha256_hex, validate_key

_MIB = 2**20

SCHEMA_VERSION = 1


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_seed_names(cls, data: Any) -> Any:
        """The seed's names are derived on output: ignore them on input."""
        if isinstance(data, dict) and cls.model_computed_fields:
            return {k: v for k, v in data.items() if k not in cls.model_computed_fields}
        return data


class BaseModelLayer(_Layer):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source: str


class ProfilingLayer(_Layer):
    profile_id: str
    prompt: str
    prompt_sha256: str
    seeds: list[int]
    steps: int
    step_stride: int
    sampled_steps: list[int]
    guidance_scale: float
    height: int
    width: int
    num_heads: int
    rank_stability: float | None
    rank_stability_reason: str | None = None


class PruningLayer(_Layer):
    method: Literal["head_pruning"] = "head_pruning"
    threshold: float  # fraction of heads kept that was used (the guard may have raised it)
    min_heads_per_layer: int
    rank_margin: float
    requested_threshold: float | None = None
    min_ssim: float | None = None  # the fidelity guard; None: off
    search: list[dict[str, float | None]] = Field(default_factory=list)
    heads_total: int
    heads_kept: int
    keep: dict[str, list[int]]
    reasons: dict[str, dict[str, list[int]]]
    params_before: int
    params_after: int

    @computed_field
    @property
    def head_retention_ratio(self) -> float:
        """Seed name: fraction of attention heads kept."""
        return round(self.heads_kept / self.heads_total, 6) if self.heads_total else 1.0

    @computed_field
    @property
    def removed(self) -> int:
        """Seed name: number of attention heads physically removed."""
        return self.heads_total - self.heads_kept

    @computed_field
    @property
    def strategy(self) -> str:
        """Seed name: how heads were chosen (global score quantile, fidelity guard or not)."""
        return "global_score_quantile" + ("+fidelity_guard" if self.min_ssim is not None else "")

    @computed_field
    @property
    def safety_margin_heads(self) -> int:
        """Seed name: heads every attention module keeps whatever their scores."""
        return self.min_heads_per_layer


class LowRankLayer(_Layer):
    energy: float
    max_cost: float
    layers: dict[str, dict[str, float]]


class Int8Layer(_Layer):
    precision_map: dict[str, Literal["int8", "float"]]
    max_abs_error: float | None
    error_bound: str = "per weight |w - q*s| <= max|w_row| / 254"


class CompressionLayer(_Layer):
    low_rank: LowRankLayer | None
    int8: Int8Layer | None
    weight_bytes_base: int
    weight_bytes_fragment: int


class QualityLayer(_Layer):
    seeds: list[int]
    metrics: dict[str, Any]
    gate: dict[str, Any]
    thresholds: dict[str, Any]

    @computed_field
    @property
    def clip_delta_mean(self) -> float | None:
        """Seed name: mean CLIP-score drop (``metrics.clip_delta``)."""
        return self.metrics.get("clip_delta")

    @computed_field
    @property
    def lpips_mean(self) -> float | None:
        """Seed name: mean LPIPS (``metrics.lpips``)."""
        return self.metrics.get("lpips")

    @computed_field
    @property
    def samples(self) -> int:
        """Seed name: images compared (one per validation seed)."""
        return len(self.seeds)

    @computed_field
    @property
    def thresholds_passed(self) -> bool | None:
        """Seed name: whether the gate passed (``gate.passed``)."""
        return self.gate.get("passed")


class PerformanceLayer(_Layer):
    device: str
    steps: int
    batch_size: int
    measured_latency_full_ms: float | None
    measured_latency_fragment_ms: float | None
    measured_speedup: float | None
    # peak memory of one batch, measured in a fresh process per model (memory_kind says how)
    memory_kind: str | None = None
    measured_peak_full_bytes: int | None = None
    measured_peak_fragment_bytes: int | None = None

    @computed_field
    @property
    def peak_vram_full_mb(self) -> float | None:
        """Seed name: the full model's measured peak (MiB; of ``memory_kind``)."""
        peak = self.measured_peak_full_bytes
        return None if peak is None else round(peak / _MIB, 1)

    @computed_field
    @property
    def peak_vram_fragment_mb(self) -> float | None:
        """Seed name: the fragment's measured peak (MiB; of ``memory_kind``)."""
        peak = self.measured_peak_fragment_bytes
        return None if peak is None else round(peak / _MIB, 1)

    @computed_field
    @property
    def latency_full_ms(self) -> float | None:
        """Seed name: ``measured_latency_full_ms``."""
        return self.measured_latency_full_ms

    @computed_field
    @property
    def latency_fragment_ms(self) -> float | None:
        """Seed name: ``measured_latency_fragment_ms``."""
        return self.measured_latency_fragment_ms


class ReuseLayer(_Layer):
    """How the fragment is found for other prompts, and how well it served paraphrases."""

    similarity: Literal["cosine_clip_text"] = "cosine_clip_text"
    threshold: float = 0.8
    prompt_embedding: list[float] | None = None
    pass_rate: float | None = None
    paraphrases: list[dict[str, Any]] = Field(default_factory=list)

    @computed_field
    @property
    def paraphrase_pass_rate(self) -> float | None:
        """Seed name: ``pass_rate``."""
        return self.pass_rate

    @computed_field
    @property
    def similarity_metric(self) -> str:
        """Seed name: ``similarity``."""
        return self.similarity


class ArtifactFile(_Layer):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int


class ArtifactsLayer(_Layer):
    files: dict[str, ArtifactFile]

    @computed_field
    @property
    def hashes(self) -> dict[str, str | None]:
        """Seed name: ``{"fragment_state_sha256": <sha256 of fragment.safetensors>}``."""
        entry = self.files.get(FRAGMENT_FILE)
        return {"fragment_state_sha256": entry.sha256 if entry else None}


class DynamicRoutingLayer(_Layer):
    """The block-caching schedule: per UNet block, the steps at which it is recomputed.

    The last four fields are optional parts of the routing (``None``: off, as in manifests
    written before them, which load and serialise unchanged): ``forecast_orders`` (per
    block, the order of the extrapolation of its skipped outputs; absent blocks reuse),
    ``cfg_steps`` (steps that run only the conditional CFG half), ``probe_change`` and
    ``probe_margin`` (the run-time probe on ``down_blocks.0``: its profiled change per step,
    and the ratio to it past which every block recomputes).
    """

    enabled: bool = False
    method: Literal["block_caching"] = "block_caching"
    steps: int | None = None
    delta: float | None = None
    shallow_delta: float | None = None  # level-0 budget; None: level 0 computes every step
    warmup_steps: int | None = None
    schedule: dict[str, list[int]] | None = None
    estimated_cost: float | None = None
    min_ssim: float | None = None
    search: list[dict[str, float | None]] = Field(default_factory=list)
    reason: str | None = None
    forecast_orders: dict[str, int] | None = None
    cfg_steps: list[int] | None = None
    probe_change: list[float] | None = None
    probe_margin: float | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_parts(self, handler: Any) -> dict[str, Any]:
        """Optional parts that are off are not written: older manifests stay byte-identical."""
        data = handler(self)
        for name in _ROUTING_PARTS:
            if data.get(name) is None:
                data.pop(name, None)
        return data


_ROUTING_PARTS = ("forecast_orders", "cfg_steps", "probe_change", "probe_margin")


class FragmentManifest(_Layer):
    """A fragment's manifest. Build it with ``model_copy(update=...)`` to change a layer."""

    schema_version: Literal[1] = SCHEMA_VERSION
    key: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    base_model: BaseModelLayer
    profiling: ProfilingLayer
    pruning: PruningLayer
    compression: CompressionLayer
    quality: QualityLayer | None = None
    performance: PerformanceLayer | None = None
    reuse: ReuseLayer = Field(default_factory=ReuseLayer)
    artifacts: ArtifactsLayer
    dynamic_routing: DynamicRoutingLayer = Field(default_factory=DynamicRoutingLayer)
    verified: bool = False

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return validate_key(value)

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys, two-space indent, trailing newline)."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def to_bytes(self) -> bytes:
        return self.to_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> FragmentManifest:
        """Parse and validate; anything else than a v1 manifest raises ManifestError."""
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
            found = raw.get("schema_version") if isinstance(raw, dict) else None
            raise ManifestError(f"manifest schema_version must be 1, found {found!r}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ManifestError(f"invalid manifest at {where}: {first['msg']}") from exc

    def verify_artifact(self, filename: str, data: bytes) -> None:
        """Raise FragmentIntegrityError unless ``data`` matches the recorded hash and size."""
        entry = self.artifacts.files.get(filename)
        if entry is None:
            raise FragmentIntegrityError(f"{self.key}: manifest lists no artifact {filename!r}")
        actual = sha256_hex(data)
        if actual != entry.sha256 or len(data) != entry.size:
            raise FragmentIntegrityError(
                f"{self.key}: {filename} does not match its manifest "
                f"(sha256 {actual[:12]}… size {len(data)}, expected {entry.sha256[:12]}… "
                f"size {entry.size}); the stored fragment is corrupt"
            )
