"""Reading the JSON files clipes and datasets write, with a clear error for a missing or broken one."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ClipesError

__all__ = ["read_json"]


def read_json(path: Path, what: str, kind: type = dict):
    """The parsed content of ``path`` (a ``kind``, an object by default), or a ClipesError naming the file.

    ``what`` says what the file is for the message (``run manifest``, ``COCO instances JSON``).
    """
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise ClipesError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise ClipesError(f"{path}: not valid JSON, truncated or damaged? ({e}); the {what} cannot be read") from None
    if not isinstance(data, kind):
        raise ClipesError(f"{path}: the {what} must hold a JSON {'object' if kind is dict else kind.__name__}, "
                          f"not {type(data).__name__}")
    return data
