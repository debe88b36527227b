"""One exception hierarchy for leuk-fhir.

Every error raised on purpose by the project derives from :class:`LeukFhirError`. Each edge maps
it once: the CLI prints one line and exits with :attr:`LeukFhirError.exit_code`, Flask answers an
RFC 7807 problem (or a FHIR OperationOutcome) with :attr:`LeukFhirError.http_status`, and the
C-STORE handler answers :attr:`LeukFhirError.dicom_status`.
"""

from __future__ import annotations

import errno
import sqlite3


class LeukFhirError(Exception):
    """Base class of every error leuk-fhir raises deliberately."""

    #: Short machine-readable type, used as the problem ``type`` suffix and in logs.
    code: str = "leuk-fhir-error"
    http_status: int = 500
    #: DICOM status for a C-STORE response (0xC000 "Cannot understand" by default).
    dicom_status: int = 0xC000
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigurationError(LeukFhirError):
    """A setting is missing or has an invalid value."""

    code = "configuration"
    exit_code = 2


class InputError(LeukFhirError):
    """Input that cannot be processed (client error)."""

    code = "invalid-input"
    http_status = 400
    exit_code = 3


class InvalidImageError(InputError):
    """An image file is unreadable, truncated, or not an image."""

    code = "invalid-image"
    http_status = 422


class ImageTooLargeError(InputError):
    """Pixel dimensions exceed the configured limit (decompression-bomb guard)."""

    code = "image-too-large"
    http_status = 413
    dicom_status = 0xA700  # Refused: out of resources


class UnsupportedFormatError(InputError):
    """A file format, DICOM SOP class or transfer syntax leuk-fhir does not handle."""

    code = "unsupported-format"
    http_status = 415
    dicom_status = 0xA900  # Error: data set does not match SOP class


class DatasetError(InputError):
    """A training / evaluation dataset is empty, has one class, or is malformed."""

    code = "invalid-dataset"


class ModelArtifactError(LeukFhirError):
    """A model file is corrupt, truncated, tampered with, or of an incompatible version."""

    code = "model-artifact"
    exit_code = 4


class NotFittedError(LeukFhirError, ValueError):
    """An estimator was used before ``fit``."""

    code = "not-fitted"


class FhirMappingError(LeukFhirError):
    """Findings cannot be turned into valid FHIR resources."""

    code = "fhir-mapping"
    http_status = 422


class DeliveryError(LeukFhirError):
    """Delivering a Bundle to the EHR failed."""

    code = "delivery"
    http_status = 502
    exit_code = 5

    #: True when retrying later may succeed (connection error, timeout, 429, 5xx).
    retryable: bool = True


class PermanentDeliveryError(DeliveryError):
    """The EHR rejected the request in a way retrying cannot fix (most 4xx)."""

    code = "delivery-rejected"
    retryable = False


class AuthenticationError(DeliveryError):
    """Authenticating to the EHR or token endpoint failed."""

    code = "authentication"


class NotFoundError(LeukFhirError):
    """A requested analysis, delivery or resource does not exist."""

    code = "not-found"
    http_status = 404


class ConflictError(LeukFhirError):
    """The request conflicts with the resource's state (e.g. signing off a report twice)."""

    code = "conflict"
    http_status = 409


class AccessDeniedError(LeukFhirError):
    """Missing or insufficient credentials for an API call or DICOM association."""

    code = "access-denied"
    http_status = 403
    dicom_status = 0xA700


class CredentialsRequiredError(AccessDeniedError):
    """An API call came without a valid token (HTTP 401, unlike a wrong role's 403)."""

    code = "credentials-required"
    http_status = 401


class RateLimitedError(LeukFhirError):
    """A client sent more requests than the configured rate allows."""

    code = "rate-limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int = 1, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class QueueFullError(LeukFhirError):
    """The work queue is full; the client should retry later."""

    code = "queue-full"
    http_status = 503
    dicom_status = 0xA700

    def __init__(self, message: str, *, retry_after_s: int = 5, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class ServiceBusyError(QueueFullError):
    """Every slot of a limited service resource (live event streams) is taken."""

    code = "service-busy"

    def __init__(self, message: str, *, retry_after_s: int = 15, hint: str | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s, hint=hint)


class ResourceExhaustedError(LeukFhirError):
    """A job ran out of a machine resource (a worker process killed for memory)."""

    code = "resource-exhausted"
    http_status = 503
    dicom_status = 0xA700
    exit_code = 6


class StorageFullError(LeukFhirError):
    """The disk holding leuk-fhir's data (spool, analyses, databases) is full: nothing of the
    input was kept; the sender should try again once space is freed."""

    code = "storage-full"
    http_status = 507
    dicom_status = 0xA700  # out of resources: a modality retries later
    exit_code = 6


def is_storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full: ``OSError`` ENOSPC or
    EDQUOT, or SQLite's "database or disk is full"."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()


def storage_full_error(exc: BaseException, where: str) -> StorageFullError:
    """The :class:`StorageFullError` for ``exc`` (see :func:`is_storage_full`) at ``where``."""
    return StorageFullError(
        f"no space left on the disk of {where}: nothing of this input was kept",
        hint="free space there (or raise the quota), then send it again",
    )
