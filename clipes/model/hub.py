"""Whether the Hugging Face hub may be asked at all: offline by setting, or unreachable."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

__all__ = ["offline", "reachable"]


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: only the cache is read."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers at all (avoids minutes of download retries offline)."""
    if offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
