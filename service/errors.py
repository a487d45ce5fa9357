"""Every error a client can cause, each with its HTTP status; service/api/exception_handlers.py maps them."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `status` is the HTTP status, the message says what to change."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(ServiceError):
    status, code = 400, "invalid_request"


class InvalidAdapterError(ServiceError):
    """An uploaded adapter is malformed or does not fit the base model."""

    status, code = 422, "invalid_adapter"


class MalformedUploadError(ServiceError):
    status, code = 400, "malformed_upload"


class AdapterNotFoundError(ServiceError):
    status, code = 404, "adapter_not_found"


class AdapterConflictError(ServiceError):
    status, code = 409, "adapter_conflict"


class PayloadTooLargeError(ServiceError):
    status, code = 413, "payload_too_large"


class UnauthorizedError(ServiceError):
    status, code = 401, "unauthorized"


class ForbiddenError(ServiceError):
    status, code = 403, "forbidden"


class QueueFullError(ServiceError):
    status, code = 503, "queue_full"


class RegistryUnavailableError(ServiceError):
    status, code = 503, "registry_unavailable"


class GenerationFailedError(ServiceError):
    """Serving one request raised unexpectedly; that request fails alone."""

    status, code = 500, "generation_failed"


class EngineUnavailableError(ServiceError):
    """The engine is starting or shutting down."""

    status, code = 503, "engine_unavailable"


class RegistryIntegrityError(ServiceError):
    """Stored bytes do not hash to the recorded sha256: the Redis data was changed behind our back."""

    status, code = 500, "registry_integrity"
