"""What an output was made from: the identity of a model, of an input file and of a run's settings.

Outputs are reused only when what made them is the same in meaning, not in spelling: a model
given by a relative or an absolute path, or copied elsewhere, is the same model (its content
hash); an image replaced in place is a different input (its size and modification time).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .defaults import DEFAULT_MODEL, MODEL_ENV

__all__ = ["file_digest", "input_stamp", "model_identity", "settings_key"]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """``sha256:<hex>`` of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def model_identity(spec: str | None) -> str:
    """What ``load_clip(spec)`` loads: a local checkpoint by its content, a named model by its name.

    Follows ``load_clip``'s reading of the spec: ``None`` is ``$CLIPES_MODEL`` or the default,
    a path to a file is that file, ``ARCH:PATH`` is an architecture with weights from a file, a
    transformers CLIP folder is the files it is loaded from.
    """
    spec = spec or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        return _folder_digest(path) or spec
    arch, sep, weights = spec.partition(":")
    if sep and not spec.startswith("hf-hub:") and Path(weights).expanduser().is_file():
        return f"{arch}:{file_digest(Path(weights).expanduser())}"
    return spec


def _folder_digest(folder: Path) -> str | None:
    """``sha256:<hex>`` over the files a transformers CLIP folder is loaded from (names and contents), or
    None where it is no such folder (``load_clip`` then says why)."""
    from .errors import ClipesError
    from .model.transformers_clip import model_files

    try:
        parts = [f"{f.name}:{file_digest(f)}" for f in model_files(folder)]
    except (ClipesError, OSError):
        return None
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def input_stamp(path: Path, file: str) -> dict[str, Any]:
    """An input image as a rerun sees it: its name in the input folder, size and modification time."""
    st = path.stat()  # follows a symlink to the file it names
    return {"file": file, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def settings_key(settings: dict[str, Any]) -> str:
    """A short digest of settings (JSON-serialisable) that changes whenever any value does."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
