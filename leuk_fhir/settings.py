"""Settings: a frozen dataclass built from defaults, an optional TOML file and the environment.

Precedence (last wins): built-in defaults, ``[section]`` tables of a TOML file
(``--config`` or ``LEUK_FHIR_CONFIG``), then environment variables named
``LEUK_FHIR_<SECTION>_<FIELD>`` (for example ``LEUK_FHIR_FHIR_BASE_URL``,
``LEUK_FHIR_DICOM_PORT``). Settings are passed explicitly; nothing reads them globally.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leuk_fhir.errors import ConfigurationError

ENV_PREFIX = "LEUK_FHIR_"


@dataclass(frozen=True)
class ModelSettings:
    #: Model artifact; None means the bundled demo model.
    path: Path | None = None
    #: Torch device: "auto" picks CUDA when present.
    device: str = "auto"
    batch_size: int = 64
    #: CPU threads for torch (0: torch's default). 1 is much faster on a loaded, shared CPU.
    threads: int = 0


@dataclass(frozen=True)
class ImageSettings:
    #: Decompression-bomb guard for whole images and frames read at once.
    max_pixels: int = 64_000_000
    #: Largest file accepted over HTTP / DICOM, in bytes.
    max_bytes: int = 512 * 1024 * 1024
    tile_size: int = 1024


@dataclass(frozen=True)
class DicomSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "LEUKFHIR"
    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_aes: tuple[str, ...] = ()
    #: "instance" analyses each received instance; "study" waits for the study to be idle.
    analysis_unit: str = "instance"
    study_idle_s: float = 5.0


@dataclass(frozen=True)
class FhirSettings:
    #: EHR FHIR base URL; None keeps reports in the outbox without sending.
    base_url: str | None = None
    #: none | bearer | basic | smart-backend
    auth: str = "none"
    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    private_key_path: Path | None = None
    key_id: str | None = None
    token_url: str | None = None
    scope: str = (
        "system/Patient.cu system/DiagnosticReport.cu system/Observation.cu "
        "system/Specimen.cu system/ImagingStudy.cu system/Media.cu system/Device.cu "
        "system/Provenance.cu system/Communication.cu"
    )
    ca_bundle: Path | None = None
    timeout_s: float = 30.0
    #: The lab organisation named as DiagnosticReport.performer.
    organization_name: str = "Haematology Laboratory"
    organization_identifier: str = "leuk-fhir-lab"
    identifier_system: str = "urn:leuk-fhir:report"
    patient_identifier_system: str = "urn:leuk-fhir:patient"
    #: Per-cell Observations beyond this many are summarised by the count Observations only.
    max_cell_observations: int = 200
    #: Reference of the practitioner or care team alerted when blasts are detected
    #: (e.g. "CareTeam/haem-oncall" or "Practitioner?identifier=sys|value"); None: no recipient.
    alert_recipient: str | None = None


@dataclass(frozen=True)
class OutboxSettings:
    max_attempts: int = 12
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    poll_interval_s: float = 1.0
    #: A claimed delivery not finished within this time is picked up again (crashed sender).
    lease_s: float = 120.0


@dataclass(frozen=True)
class ServiceSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    queue_size: int = 64
    max_request_bytes: int = 256 * 1024 * 1024
    rate_limit_per_minute: int = 600
    #: When True the API requires tokens; the zero-configuration demo runs open on loopback.
    require_auth: bool = False


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=lambda: Path("leuk-fhir-data"))
    model: ModelSettings = field(default_factory=ModelSettings)
    image: ImageSettings = field(default_factory=ImageSettings)
    dicom: DicomSettings = field(default_factory=DicomSettings)
    fhir: FhirSettings = field(default_factory=FhirSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with top-level fields or ``section__field`` keys changed."""
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if "__" in key:
                section, name = key.split("__", 1)
                sections.setdefault(section, {})[name] = value
            else:
                top[key] = value
        for section, values in sections.items():
            top[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **top)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a TOML or environment value to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is Path:
            return Path(value).expanduser()
        if origin is tuple:
            items = value if isinstance(value, list | tuple) else str(value).split(",")
            return tuple(str(i).strip() for i in items if str(i).strip())
        if annotation is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"invalid value {value!r} for {where}") from exc
    return value


def _build(cls: type, values: Mapping[str, Any], env: Mapping[str, str], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        env_name = f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(annotation):
            sub = values.get(f.name, {})
            if not isinstance(sub, Mapping):
                raise ConfigurationError(f"[{f.name}] must be a table in the config file")
            kwargs[f.name] = _build(typing.cast(type, annotation), sub, env, f"{env_name}_")
        elif env_name in env:
            kwargs[f.name] = _coerce(env[env_name], annotation, env_name)
        elif f.name in values:
            kwargs[f.name] = _coerce(values[f.name], annotation, f.name)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigurationError(f"unknown setting(s) {sorted(unknown)} in config file")
    return cls(**kwargs)


def load_settings(
    config_file: Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build :class:`Settings` from defaults, ``config_file`` (TOML) and ``env``."""
    env = os.environ if env is None else env
    if config_file is None and env.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(env[f"{ENV_PREFIX}CONFIG"])
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"cannot read config file {config_file}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"config file {config_file} is not valid TOML: {exc}") from exc
    return _build(Settings, values, env, ENV_PREFIX)
