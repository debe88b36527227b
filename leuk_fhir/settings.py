"""Settings: a frozen dataclass built from defaults, an optional TOML file and the environment.

Precedence (last wins): built-in defaults, ``[section]`` tables of a TOML file
(``--config`` or ``LEUK_FHIR_CONFIG``), then environment variables named
``LEUK_FHIR_<SECTION>_<FIELD>`` (for example ``LEUK_FHIR_FHIR_BASE_URL``,
``LEUK_FHIR_DICOM_PORT``). Settings are passed explicitly; nothing reads them globally.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
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


def _coerce(value: Any, annotation: Any, where: str, *, from_env: bool = False) -> Any:
    """Convert a TOML or environment value to the field's annotated type.

    Environment values are text and are parsed; TOML values already carry a type, which must
    match the field's (an integer for a port, a boolean for a flag), as the docs promise.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, from_env=from_env)
    if not from_env:
        _check_toml_type(value, annotation, where)
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
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if annotation is Path:
            if not str(value).strip():
                raise ValueError(value)
            return Path(value).expanduser()
        if origin is tuple:
            items = value if isinstance(value, list | tuple) else str(value).split(",")
            return tuple(str(i).strip() for i in items if str(i).strip())
        if annotation is str:
            if not str(value).strip():
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"invalid value {value!r} for {where}") from exc
    return value


_TOML_TYPES: dict[Any, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str,),
    Path: (str,),
}
_TOML_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                    Path: "a path string"}


def _check_toml_type(value: Any, annotation: Any, where: str) -> None:
    """Reject a TOML value whose type does not match the field (``port = 1.5``, ``"8000"``)."""
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise ConfigurationError(f"{where} must be a list of strings, not {value!r}")
        return
    expected = _TOML_TYPES.get(annotation)
    if expected is None:
        return
    # bool is a subclass of int: ``port = true`` is not a port.
    if not isinstance(value, expected) or (annotation is not bool and isinstance(value, bool)):
        raise ConfigurationError(
            f"{where} must be {_TOML_TYPE_NAMES[annotation]}, not {type(value).__name__} {value!r}"
        )


def _range(low: float | None = None, high: float | None = None, *, strict: bool = False) -> Any:
    def check(value: Any) -> str | None:
        if low is not None and (value <= low if strict else value < low):
            return f"must be {'greater than' if strict else 'at least'} {low:g}"
        if high is not None and value > high:
            return f"must be at most {high:g}"
        return None

    return check


def _one_of(*choices: str, pattern: str | None = None, fold_case: bool = False) -> Any:
    def check(value: Any) -> str | None:
        text = str(value).strip().lower() if fold_case else str(value)
        if text in choices or (pattern is not None and re.fullmatch(pattern, text)):
            return None
        return f"must be one of {' | '.join(choices)}" + (" or e.g. cuda:0" if pattern else "")

    return check


def _http_url(value: Any) -> str | None:
    if re.match(r"https?://[^/\s]+", str(value).strip(), re.IGNORECASE):
        return None
    return "must be an http:// or https:// URL"


_PORT = _range(0, 65535)  # 0: any free port
_POSITIVE_INT = _range(1)
_POSITIVE_S = _range(0, strict=True)

#: Value checks per ``section.field``; each returns None or what is wrong.
_CHECKS: dict[str, Any] = {
    "model.device": _one_of("auto", "cpu", "cuda", "mps", pattern=r"cuda:\d+"),
    "model.batch_size": _POSITIVE_INT,
    "model.threads": _range(0),
    "image.max_pixels": _POSITIVE_INT,
    "image.max_bytes": _POSITIVE_INT,
    "image.tile_size": _POSITIVE_INT,
    "dicom.port": _PORT,
    "dicom.ae_title": lambda v: None if 0 < len(v.strip()) <= 16 else "must be 1 to 16 characters",
    "dicom.analysis_unit": _one_of("instance", "study"),
    "dicom.study_idle_s": _POSITIVE_S,
    "fhir.base_url": _http_url,
    "fhir.auth": _one_of("none", "bearer", "basic", "smart-backend", "smart", fold_case=True),
    "fhir.timeout_s": _POSITIVE_S,
    "fhir.max_cell_observations": _range(0),
    "outbox.max_attempts": _POSITIVE_INT,
    "outbox.backoff_initial_s": _POSITIVE_S,
    "outbox.backoff_max_s": _POSITIVE_S,
    "outbox.poll_interval_s": _POSITIVE_S,
    "outbox.lease_s": _POSITIVE_S,
    "service.port": _PORT,
    "service.workers": _POSITIVE_INT,
    "service.queue_size": _POSITIVE_INT,
    "service.max_request_bytes": _POSITIVE_INT,
    "service.rate_limit_per_minute": _range(0),  # 0: no limit
}


def _build(
    cls: type, values: Mapping[str, Any], env: Mapping[str, str], prefix: str, section: str = ""
) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        env_name = f"{prefix}{f.name.upper()}"
        key = f"{section}.{f.name}" if section else f.name
        if dataclasses.is_dataclass(annotation):
            sub = values.get(f.name, {})
            if not isinstance(sub, Mapping):
                raise ConfigurationError(f"[{f.name}] must be a table in the config file")
            kwargs[f.name] = _build(
                typing.cast(type, annotation), sub, env, f"{env_name}_", f.name
            )
            continue
        if env_name in env:
            kwargs[f.name] = _coerce(env[env_name], annotation, env_name, from_env=True)
            sources[f.name] = env_name
        elif f.name in values:
            kwargs[f.name] = _coerce(values[f.name], annotation, key)
            sources[f.name] = key
        else:
            continue
        check = _CHECKS.get(key)
        problem = check(kwargs[f.name]) if check is not None and kwargs[f.name] is not None else None
        if problem:
            raise ConfigurationError(f"invalid value {kwargs[f.name]!r} for {sources[f.name]}: {problem}")
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        names = sorted(f"{section}.{u}" if section else u for u in unknown)
        raise ConfigurationError(f"unknown setting(s) {names} in config file")
    built = cls(**kwargs)
    if section == "outbox" and built.backoff_max_s < built.backoff_initial_s:
        raise ConfigurationError(
            f"outbox.backoff_max_s ({built.backoff_max_s:g}) is below "
            f"outbox.backoff_initial_s ({built.backoff_initial_s:g})"
        )
    return built


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
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"config file {config_file} is not UTF-8 text: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"config file {config_file} is not valid TOML: {exc}") from exc
    _refuse_unknown_environment(env)
    return _build(Settings, values, env, ENV_PREFIX)


def _refuse_unknown_environment(env: Mapping[str, str]) -> None:
    """A ``LEUK_FHIR_<SECTION>_...`` variable of a known section that names no setting is a
    mistake (a misspelt ``LEUK_FHIR_FHIR_BASEURL`` would leave every report in the outbox), as
    an unknown key in the file is. Variables outside the sections (``LEUK_FHIR_TEST_*``,
    ``LEUK_FHIR_HAPI_*`` of the test harness) are not settings and are left alone."""
    hints = typing.get_type_hints(Settings)
    sections = {
        f.name.upper(): [g.name.upper() for g in dataclasses.fields(hints[f.name])]
        for f in dataclasses.fields(Settings)
        if dataclasses.is_dataclass(hints[f.name])
    }
    unknown: list[str] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, rest = name[len(ENV_PREFIX) :].partition("_")
        if section in sections and rest not in sections[section]:
            guess = difflib.get_close_matches(rest, sections[section], n=1)
            unknown.append(
                f"{name} (did you mean {ENV_PREFIX}{section}_{guess[0]}?)" if guess else name
            )
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) in the environment: {', '.join(unknown)}",
            hint="environment variables are LEUK_FHIR_<SECTION>_<FIELD>; docs/configuration.md "
            "lists them",
        )
