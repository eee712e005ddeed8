"""Where an export goes: checked before any work, built aside, then put in place whole.

A folder is built as a hidden sibling (``.NAME.<random>.tmp``) and renamed into place, replacing an
earlier export of the same format; a file (a COCO JSON, a zip archive) is written to a temporary
file and renamed. An export that fails leaves nothing behind, and a rerun replaces the whole.
"""

from __future__ import annotations

import os
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..output import OutputError, check_outside, check_writable

__all__ = ["FolderSink", "ZipSink", "check_target", "staged_file", "staged_folder"]


def check_target(out: Path, sources: list[Path], folder: bool, ours: Callable[[Path], bool] | None = None,
                 what: str = "export") -> None:
    """Refuse an ``--out`` inside any of ``sources`` (the run, its photos) or that cannot be written.

    A ``folder`` target may exist only empty or as an earlier ``what`` (``ours`` says if it is one),
    which the export replaces; a file target may exist as a file, which it replaces.
    """
    for src in sources:
        if src.is_dir():
            check_outside(src, out)
    if not folder and out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name")
    if folder and out.exists():
        if not out.is_dir():
            raise OutputError(f"--out {out} is a file; give a folder for the {what}")
        if any(out.iterdir()) and (ours is None or not ours(out)):
            raise OutputError(f"--out {out} holds other files (not an earlier {what}); choose an empty or new folder")
    check_writable(out.parent if out.exists() else out)


def _new_name(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{secrets.token_hex(6)}.{kind}"


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A fresh folder to build the export in; on success it becomes ``out`` (an earlier one is removed)."""
    tmp = _new_name(out, "tmp")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
    try:
        yield tmp
        old = _new_name(out, "old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` to write the export to; on success it is renamed to ``out``."""
    tmp = _new_name(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


class FolderSink:
    """Files of an export written under a (staging) folder; photos linked or copied."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def add_file(self, name: str, source: Path, link: bool) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if link:
            path.symlink_to(source.resolve())
        else:
            shutil.copyfile(source, path)


class ZipSink:
    """Files of an export stored in a zip archive (PNGs and photos uncompressed: they are already)."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive

    def put(self, name: str, data: bytes) -> None:
        compress = zipfile.ZIP_STORED if name.lower().endswith(".png") else zipfile.ZIP_DEFLATED
        self.archive.writestr(name, data, compress_type=compress)

    def add_file(self, name: str, source: Path, link: bool) -> None:
        self.archive.write(source, name, compress_type=zipfile.ZIP_STORED)  # a zip holds no links: a copy
