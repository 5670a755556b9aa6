"""ServiceError: how the service ends a request that gets no images, as an HTTP status and a message.

An HTTP concept, raised by the admission policy (admission.py: 429, 503) and by the workers (a
failed step: 500; a dead or restarting engine process: 503 with Retry-After), and turned into the
response by app.py. It lives
apart from both so that neither the workers nor the policy import the web framework.
"""
from __future__ import annotations

from typing import Optional


class ServiceError(Exception):
    """A request the service ends with an HTTP error: `status` and a message for the caller."""

    def __init__(self, status: int, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
