"""Reading the JSON files clipes and datasets write, with a clear error for a missing or broken one."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from .errors import ClipesError

__all__ = ["read_json", "read_run_labels"]


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


def read_run_labels(path: Path) -> dict[str, dict]:
    """``labels.json``: stem -> record; a clear error for a broken file or a stem that leaves the run folder."""
    records = read_json(path, "run's labels")
    for stem, rec in records.items():
        if not isinstance(rec, dict) or not isinstance(rec.get("labels", []), list):
            raise ClipesError(f"{path}: entry {stem!r} is not a record with a 'labels' list")
        if not stem or PurePosixPath(stem).is_absolute() or ".." in PurePosixPath(stem).parts:
            raise ClipesError(f"{path}: entry {stem!r} is not a path inside the run")
    return records
