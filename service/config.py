"""One typed settings tree: TOML file (`--config`), then `TOMOCAST_*` environment, then flags.

Environment variables name nested settings with a double underscore:
`TOMOCAST_INGEST__ENDPOINT=tcp://0.0.0.0:5555`. Each component receives only its own section.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from service.errors import ConfigError
from service.protocol import Limits

log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_endpoint(value: str) -> str:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"{value!r} is not a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)")
    return value


_LIMITS = Limits()  # the defaults of the ingest limits, defined once in service.protocol


class IngestSettings(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5555", description="PULL socket the DAQ connects to")
    mode: Literal["bind", "connect"] = Field(
        "bind",
        description="bind: the DAQ connects to ingest.endpoint; connect: the DAQ (or a gateway "
        "such as DECTRIS Stream or ADZMQ) binds there and the service connects, reconnecting "
        "whenever it restarts",
    )
    rcvhwm: int = Field(64, ge=1, description="messages ZeroMQ buffers before the DAQ blocks")
    max_message_bytes: int = Field(
        1 << 30,
        ge=1024,
        description="hard cap per message; a peer sending more is disconnected by ZeroMQ",
    )
    max_rows: int = Field(_LIMITS.max_rows, ge=1, description="largest detector height accepted")
    max_cols: int = Field(_LIMITS.max_cols, ge=1, description="largest detector width accepted")
    max_angles: int = Field(_LIMITS.max_angles, ge=1, description="most projections per scan")
    max_reference_frames: int = Field(
        _LIMITS.max_reference_frames, ge=1, description="most darks or flats per scan"
    )
    max_scan_bytes: int = Field(
        _LIMITS.max_scan_bytes,
        ge=1,
        description="largest float32 sinogram buffer (rows*angles*cols*4)",
    )
    max_live_scans: int = Field(_LIMITS.max_live_scans, ge=1, description="scans assembled at once")
    max_live_bytes: int = Field(
        _LIMITS.max_live_bytes,
        ge=1,
        description="sinogram memory of all scans being assembled, together",
    )
    sinogram_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="storage of scans being assembled: float16 halves it (twice the "
        "scans in max_live_bytes) at ~5e-4 relative rounding; FBP computes in float32 either "
        "way. Raw float32 scans keep float32. max_scan_bytes still counts 4 bytes a value "
        "(docs/benchmarks.md)",
    )
    scan_timeout_s: float = Field(
        600.0, gt=0, description="a scan with no message for this long is ended and released"
    )
    idle_evict_s: float = Field(
        30.0,
        gt=0,
        description="when a new scan_start finds no room (max_live_scans, max_live_bytes), "
        "live scans silent for at least this long are evicted (failed, idle longest first) to "
        "make it; a silent client cannot lock the DAQ out",
    )
    max_live_scans_per_client: int = Field(
        2,
        ge=0,
        description="with CURVE on (security.server_secret_key): most scans one client key "
        "may have live at once, so one key cannot hold every place in max_live_scans; that "
        "client's own scans silent for idle_evict_s make way first. 0: no cap. Without CURVE "
        "a client has no identity the service can trust, so the cap does not apply",
    )

    _endpoint = field_validator("endpoint")(_check_endpoint)

    def limits(self) -> Limits:
        return Limits(
            max_rows=self.max_rows,
            max_cols=self.max_cols,
            max_angles=self.max_angles,
            max_reference_frames=self.max_reference_frames,
            max_scan_bytes=self.max_scan_bytes,
            max_live_scans=self.max_live_scans,
            max_live_bytes=self.max_live_bytes,
        )


class PublishSettings(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5556", description="PUB socket viewers connect to")
    sndhwm: int = Field(
        256,
        ge=16,
        description="messages queued per viewer before its slices are dropped "
        "(memory per stalled viewer: about sndhwm x slice bytes)",
    )
    recon: bool = Field(False, description="also publish the plain FBP slice (topic 'recon')")
    # EPICS PV Access (service.pva; the extra tomocast[pva])
    pva_prefix: str = Field(
        "",
        max_length=64,
        pattern=r"^[A-Za-z0-9_:.\-]*$",
        description="serve the latest slice and scan status over EPICS PV Access as "
        "<prefix>Slice, <prefix>Recon, <prefix>ScanId, ... (needs p4p; empty: off)",
    )

    _endpoint = field_validator("endpoint")(_check_endpoint)


class WorkerSettings(_Section):
    device: str = Field("auto", description="auto (CUDA if present), cpu, cuda or cuda:N")
    batch_rows: int = Field(8, ge=1, description="detector rows reconstructed per batch")
    filter_name: Literal["ramp", "shepp-logan", "cosine", "hamming", "hann", "parzen"] = Field(
        "ramp", description="FBP filter"
    )
    fbp_method: Literal["auto", "direct", "gridding"] = Field(
        "auto",
        description="FBP algorithm: gridding (NUFFT) or direct back-projection; auto "
        "picks the faster for the device (docs/benchmarks.md)",
    )
    circle_mask: bool = Field(False, description="zero pixels outside the reconstruction circle")
    prepare_geometry: bool = Field(
        True,
        description="build each scan's FBP geometry when the scan starts, while its "
        "projections arrive, not in its first batch (docs/benchmarks.md)",
    )
    queue_scans: int = Field(2, ge=1, description="complete scans waiting for the worker")
    drain_timeout_s: float = Field(
        120.0, ge=0, description="on SIGTERM/SIGINT, time allowed to finish complete scans"
    )
    devices: list[str] = Field(
        default_factory=list,
        description="several devices in this process, e.g. cuda:0,cuda:1 (cpu allowed): each "
        "reconstructs and denoises a share of every scan's rows (docs/scale.md); empty: "
        "worker.device alone",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (
            value.startswith("cuda:") and value[5:].isdigit()
        ):
            raise ValueError(f"device={value!r}: use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        """A flag or environment value may list the devices comma-separated."""
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        if isinstance(value, list):
            for name in value:
                cls._device(name)
        return value


class ModelSettings(_Section):
    """The denoiser: which artifact, and how it runs."""

    path: Path | None = Field(None, description="denoiser artifact; default: the shipped model")
    enabled: bool = Field(True, description="denoise slices (off: topic 'slice' carries FBP)")
    precision: Literal["artifact", "auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto",
        description="denoiser arithmetic: auto = fp16 on CUDA, bf16 on CPUs with "
        "native bf16, else int8 if it matches fp32 at load (docs/benchmarks.md), else fp32",
    )
    memory_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="activation memory per denoiser call; larger slices "
        "are denoised in overlapping tiles (default: no limit)",
    )
    field_width: int | None = Field(
        None,
        ge=1,
        description="detector pixels across the full field of view, when scans "
        "read out a region of interest: the model's input scale follows it instead of each "
        "slice's width (docs/model-card.md)",
    )
    # ---- adaptation to the user's sample (service/adapt.py, docs/adaptation.md) ----
    adapt: bool = Field(
        False,
        description="after each completed scan, fine-tune a copy of the denoiser on it in the "
        "background (Noise2Inverse, no ground truth) and swap the weights in between scans "
        "(event model_updated; docs/operations.md, 'Adaptation')",
    )
    adapt_seconds: float = Field(
        120.0, gt=0, description="training seconds per adaptation (steps only, not set-up)"
    )
    adapt_threads: int = Field(
        1,
        ge=1,
        description="CPU threads the adaptation computes on (its share of the machine; on "
        "CUDA it trains only while no scan is being reconstructed)",
    )
    adapt_memory_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="what adaptation may hold per scan (kept sinogram rows + training pairs): "
        "a larger scan is adapted on its central rows that fit",
    )
    adapt_steps: int | None = Field(
        None, ge=1, description="at most this many training steps per adaptation (None: no cap)"
    )
    adapt_dir: Path | None = Field(
        None,
        description="where adapted artifacts are kept (default: a temporary folder removed "
        "at stop)",
    )

    @model_validator(mode="after")
    def _adapt_needs_a_denoiser(self) -> ModelSettings:
        if self.adapt and not self.enabled:
            raise ValueError("model.adapt = true needs the denoiser: set model.enabled = true")
        return self


# workers.guard's DEFAULT_THRESHOLD and DEFAULT_MAX_ANGLES, written out so that loading settings
# does not import torch (tests/unit/service/test_guard.py checks they agree)
GUARD_THRESHOLD = 1.25
GUARD_MAX_ANGLES = 90


class GuardSettings(_Section):
    """The no-harm guard (service/guard.py): a denoised slice the measured data contradict is
    replaced by its plain FBP."""

    enabled: bool = Field(
        True,
        description="score every denoised slice against its measured sinogram and publish "
        "plain FBP where the data contradict it (only while a denoiser runs)",
    )
    threshold: float = Field(
        GUARD_THRESHOLD,
        description="keep the denoised slice when consistency <= this; 1.0: no worse "
        "fit to the data than FBP (docs/operations.md, 'No-harm guard')",
    )
    max_angles: int = Field(
        GUARD_MAX_ANGLES,
        description="compare at every k-th angle, k the smallest leaving at most this many",
    )
    noise: Literal["estimated", "photon"] = Field(
        "estimated",
        description="the measurement noise the misfit is weighed by: 'estimated' from each "
        "sinogram (any detector), or 'photon': Poisson counts from the flat's counts, for "
        "raw-count scans from a photon-counting detector without dark noise (a detector with "
        "gain, dark or read noise makes good slices look contradicted; docs/operations.md)",
    )

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"guard.threshold={value} must be a finite number > 0: consistency is the "
                "denoised slice's misfit over FBP's (1.0: as good as FBP; default "
                f"{GUARD_THRESHOLD})"
            )
        return value

    @field_validator("max_angles")
    @classmethod
    def _max_angles(cls, value: int) -> int:
        if value < 1:
            raise ValueError(
                f"guard.max_angles={value} must be >= 1 (default {GUARD_MAX_ANGLES}; set it "
                "to the scan's angles or more to compare at every angle)"
            )
        return value


class ArchiveSettings(_Section):
    directory: Path | None = Field(
        None, description="write every scan's slices to DIR/<scan_id>.h5 (default: off)"
    )
    recon: bool = Field(False, description="also archive the plain FBP slices")
    queue_items: int = Field(
        64, ge=1, description="slice batches waiting for the disk before the worker waits"
    )
    compression: Literal["none", "bitshuffle-lz4", "blosc-lz4", "gzip"] = Field(
        "none",
        description="HDF5 filter of the slice datasets; bitshuffle-lz4 and blosc-lz4 need "
        "hdf5plugin (the extra tomocast[nexus]), and so does whoever reads the file",
    )


class SecuritySettings(_Section):
    server_secret_key: Path | None = Field(
        None,
        description="CURVE: the service's NAME.key_secret file; set = encrypted and "
        "authenticated ingest and publisher (tomocast keys generate)",
    )
    allowed_clients: Path | None = Field(
        None, description="CURVE: directory of the public *.key files of allowed clients"
    )

    @model_validator(mode="after")
    def _both_or_neither(self) -> SecuritySettings:
        if (self.server_secret_key is None) != (self.allowed_clients is None):
            raise ValueError(
                "set both server_secret_key and allowed_clients (CURVE on) or neither (CURVE off)"
            )
        return self


class MetricsSettings(_Section):
    host: str = Field("127.0.0.1", description="address of /metrics, /healthz, /readyz")
    port: int = Field(9876, ge=0, le=65535, description="HTTP port (0: pick a free one)")


class PreviewSettings(_Section):
    """Previews: partial reconstructions of a few rows while a scan arrives (service.preview,
    docs/operations.md, "Previews")."""

    enabled: bool = Field(
        True,
        description="publish partial FBP slices of a few rows on topic 'preview' while a scan's "
        "projections arrive (viewers that do not subscribe to it see no change)",
    )
    # NoDecode: the environment's value reaches `_rows_text` as text (10,20 or [10, 20])
    rows: Annotated[tuple[int, ...], NoDecode] = Field(
        (),
        description="detector rows previewed; empty: the middle row and the rows a quarter "
        "from each end (rows beyond a scan's detector are left out)",
    )
    rate_hz: float = Field(2.0, gt=0, le=50, description="previews of one scan per second, at most")
    queue_items: int = Field(
        4,
        ge=1,
        description="snapshots waiting for the preview thread; when full the oldest is dropped "
        "(a later snapshot holds all its angles) and counted",
    )

    @field_validator("rows", mode="before")
    @classmethod
    def _rows_text(cls, value: Any) -> Any:
        """`--preview.rows 10,20` and TOMOCAST_PREVIEW__ROWS=10,20 as well as a list."""
        if isinstance(value, str):
            parts = [part.strip() for part in value.strip().strip("[]()").split(",")]
            try:
                return [int(part) for part in parts if part]
            except ValueError:
                raise ValueError(f"rows={value!r}: give row numbers, e.g. 10,20") from None
        return value

    @field_validator("rows")
    @classmethod
    def _rows(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(row < 0 for row in value):
            raise ValueError(f"rows={list(value)}: detector rows are counted from 0")
        return tuple(sorted(set(value)))


class IncrementalSettings(_Section):
    """Incremental reconstruction: a scan's FBP done block by block while its projections
    arrive (service.incremental, docs/operations.md, "Incremental reconstruction")."""

    enabled: bool = Field(
        False,
        description="fold each block of projections into the scan's FBP as it arrives, so at "
        "scan_end only the rest (and the denoiser) is left; for scans whose centre is known "
        "at scan_start and that need no whole-sinogram preprocessing",
    )
    max_bytes: int = Field(
        1 << 30,
        ge=0,
        description="accumulator bytes for all scans being received; rows beyond are "
        "reconstructed at scan_end as without incremental",
    )
    block_angles: int = Field(
        32, ge=1, description="projections per block folded in at once (the last one at scan_end)"
    )


# Stripe removal methods of workers.preprocess.stripes.METHODS (not imported here: the settings
# load without torch); tests/unit/service/test_preprocess_settings.py keeps the two equal.
StripeRemoval = Literal[
    "none", "auto", "sorting", "filtering", "large", "vo-all", "fourier-wavelet"
]
STRIPE_REMOVAL: tuple[str, ...] = get_args(StripeRemoval)
# scan_start meta keys that give phase retrieval's parameters (they win over the settings)
PAGANIN_META = ("energy_kev", "distance_m", "pixel_size_m", "delta_beta")


class PreprocessSettings(_Section):
    """What is done to a scan's data before FBP (service.preprocess, docs/operations.md)."""

    center: Literal["auto"] | float = Field(
        "auto",
        description="rotation axis (tomocast's convention, cols/2 = the detector's middle) of "
        "scans whose scan_start declares none: auto = estimated from the data once per scan "
        "(Vo's method; mirror registration for a full turn), a number = that axis for every "
        "scan. A centre in scan_start always wins",
    )
    stripe_removal: StripeRemoval = Field(
        "none",
        description="ring artifacts removed from the sinograms before FBP: none, auto (the "
        "recommended: Vo's filtering), sorting, filtering, large, vo-all or fourier-wavelet "
        "(workers/preprocess/stripes.py)",
    )
    zingers: Literal["none", "auto"] = Field(
        "none",
        description="auto: bright outlier pixels (stray X-rays) in raw projections replaced by "
        "their 3x3 median before -log, and counted",
    )
    phase_retrieval: Literal["none", "paganin"] = Field(
        "none",
        description="paganin: single-distance phase retrieval of raw projections before -log, "
        "with energy_kev, distance_m, pixel_size_m and delta_beta from scan_start meta (first) "
        "or these settings",
    )
    energy_kev: float | None = Field(None, gt=0, description="phase retrieval: X-ray energy")
    distance_m: float | None = Field(
        None, ge=0, description="phase retrieval: sample to detector distance, metres"
    )
    pixel_size_m: float | None = Field(
        None, gt=0, description="phase retrieval: detector pixel size at the sample, metres"
    )
    delta_beta: float | None = Field(
        None, gt=0, description="phase retrieval: delta/beta of the sample's material"
    )
    half_acquisition: bool = Field(
        False,
        description="360-degree scans have their axis near a detector edge (offset axis): "
        "stitched to 180 degrees on a wider slice before FBP, the overlap found from the data",
    )

    @field_validator("center")
    @classmethod
    def _center(cls, value: str | float) -> str | float:
        if not isinstance(value, str) and not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"center={value!r}: use auto or the axis in pixels from the detector's left edge "
                "(>= 0; cols/2 is the middle)"
            )
        return value


class ClusterSettings(_Section):
    """Where the rows of a scan are reconstructed and denoised (docs/scale.md)."""

    engine: Literal["local", "ray"] = Field(
        "local", description="local: in this process (worker.devices); ray: worker actors on Ray"
    )
    address: str = Field(
        "",
        description="Ray cluster to join (ray://HOST:10001 or HOST:6379); empty: start a "
        "local Ray instance on 127.0.0.1, stopped with the service",
    )
    workers: int = Field(2, ge=1, description="Ray worker actors, one GPU each when there are")
    unit_rows: int = Field(
        128,
        ge=1,
        description="rows per work unit handed to a device or actor (rounded up to "
        "worker.batch_rows): smaller streams sooner, larger repeats fewer halo rows",
    )
    in_flight: int = Field(
        2, ge=1, description="work units queued per device or actor (backpressure)"
    )
    replacements: int = Field(
        3,
        ge=0,
        description="Ray: a lost actor is replaced by a new one, at most this many times in a "
        "row without a unit completed (0: never replaced)",
    )


# Settings that moved: old (section, name) -> new (section, name). Old keys are accepted, with a
# warning, until the next minor version.
MOVED_SETTINGS: dict[tuple[str, str], tuple[str, str]] = {
    ("worker", "denoise_precision"): ("model", "precision"),
    ("worker", "denoise_memory_bytes"): ("model", "memory_bytes"),
}


class Settings(BaseSettings):
    """The whole configuration. Immutable once loaded."""

    model_config = SettingsConfigDict(
        env_prefix="TOMOCAST_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    ingest: IngestSettings = IngestSettings()
    publish: PublishSettings = PublishSettings()
    worker: WorkerSettings = WorkerSettings()
    model: ModelSettings = ModelSettings()
    guard: GuardSettings = GuardSettings()
    archive: ArchiveSettings = ArchiveSettings()
    security: SecuritySettings = SecuritySettings()
    metrics: MetricsSettings = MetricsSettings()
    preview: PreviewSettings = PreviewSettings()
    incremental: IncrementalSettings = IncrementalSettings()
    preprocess: PreprocessSettings = PreprocessSettings()

    cluster: ClusterSettings = ClusterSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """Settings that moved keep working for now, with a warning naming the new key."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for (old_section, old_name), (new_section, new_name) in MOVED_SETTINGS.items():
            section = data.get(old_section)
            if not isinstance(section, dict) or old_name not in section:
                continue
            section = dict(section)
            value = section.pop(old_name)
            target = data.get(new_section) or {}
            target = dict(target.model_dump() if isinstance(target, BaseModel) else target)
            old, new = f"{old_section}.{old_name}", f"{new_section}.{new_name}"
            if new_name in target:
                raise ValueError(f"{old} and {new} are both set: keep {new} ({old} is deprecated)")
            target[new_name] = value
            data[old_section], data[new_section] = section, target
            log.warning(
                "setting %s is deprecated: use %s (TOMOCAST_%s__%s)",
                old,
                new,
                new_section.upper(),
                new_name.upper(),
            )
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags (init) > environment > TOML file; no dotenv, no secrets dir.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def _check_environment_sections(environ: Mapping[str, str]) -> None:
    """Refuse `TOMOCAST_<SECTION>__<NAME>` for a section that does not exist, as an unknown
    name inside a section is refused: pydantic-settings would ignore it silently, so a typo
    (TOMOCAST_WROKER__DEVICE) would leave the setting at its default."""
    sections = sorted(
        name
        for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    )
    for key in environ:
        if not key.upper().startswith("TOMOCAST_") or "__" not in key:
            continue
        section = key[len("TOMOCAST_") :].split("__", 1)[0].lower()
        if section not in sections:
            raise ConfigError(
                f"environment variable {key}: there is no settings section {section!r} "
                f"(sections: {', '.join(sections)})"
            )


def load_settings(config: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load settings; `overrides` is the nested dict of flags given on the command line."""
    if config is not None and not config.is_file():
        raise ConfigError(f"config file {config} does not exist")
    _check_environment_sections(os.environ)

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=config)

    try:
        return _FromFile(**(overrides or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        source = f" (file {config}, TOMOCAST_* environment, flags)" if config else ""
        raise ConfigError(f"invalid settings{source}: {problems}") from None


# ---- command-line flags generated from the tree ------------------------------------------------

# The fixed flags outside clients rely on (DESIGN.md), mapped onto the tree.
FIXED_FLAGS = {
    "--ingest": ("ingest", "endpoint"),
    "--publish": ("publish", "endpoint"),
    "--metrics-port": ("metrics", "port"),
    "--model": ("model", "path"),
    "--device": ("worker", "device"),
}


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Add `--config`, the fixed flags and one `--section.name` flag per setting, with defaults."""
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    for flag, (section, name) in FIXED_FLAGS.items():
        field = Settings.model_fields[section].annotation.model_fields[name]  # type: ignore[union-attr]
        parser.add_argument(
            flag,
            dest=f"{section}.{name}",
            default=None,
            metavar=name.upper(),
            help=f"{field.description} (default: {field.default})",
        )
    for section, section_field in Settings.model_fields.items():
        model = section_field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            parser.add_argument(
                f"--{section.replace('_', '-')}",
                dest=section,
                default=None,
                help=f"(default: {section_field.default})",
            )
            continue
        group = parser.add_argument_group(f"[{section}] settings")
        for name, field in model.model_fields.items():
            group.add_argument(
                f"--{section}.{name}",
                dest=f"{section}.{name}",
                default=None,
                metavar="VALUE",
                help=f"{field.description} (default: {field.default})",
            )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The nested dict of settings given as flags (unset flags are left out)."""
    nested: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None or key == "config":
            continue
        section, _, name = key.partition(".")
        if section not in Settings.model_fields:
            continue
        if name:
            nested.setdefault(section, {})[name] = value
        else:
            nested[section] = value
    return nested
