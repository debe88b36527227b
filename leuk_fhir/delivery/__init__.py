"""Delivery to EHRs: authenticated FHIR client, durable outbox, background sender."""

from leuk_fhir.delivery.auth import (
    BasicAuth,
    BearerAuth,
    EhrAuth,
    NoAuth,
    SmartBackendAuth,
    auth_from_settings,
)
from leuk_fhir.delivery.client import (
    Capabilities,
    EhrAuthRejectedError,
    EhrClient,
    EhrEndpointError,
    EhrRedirectError,
    EhrRejectedError,
    EhrUnavailableError,
    TransactionResult,
)
from leuk_fhir.delivery.outbox import Delivery, DeliveryStatus, Outbox, OutboxSender, backoff_delay

__all__ = [
    "BasicAuth", "BearerAuth", "Capabilities", "Delivery", "DeliveryStatus", "EhrAuth", "EhrAuthRejectedError",
    "EhrClient", "EhrEndpointError", "EhrRedirectError", "EhrRejectedError", "EhrUnavailableError", "NoAuth", "Outbox", "OutboxSender", "SmartBackendAuth",
    "TransactionResult", "auth_from_settings", "backoff_delay",
]
