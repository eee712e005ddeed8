"""Where an export goes: checked before any work, built aside, then put in place whole.

A folder is built as a hidden sibling (``.NAME.<random>.tmp``) and renamed into place, replacing an
earlier export of the same format; a file (a COCO JSON, a zip archive) is written to a temporary
file and renamed. An export that fails leaves nothing behind, and a rerun replaces the whole.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..output import OutputError, check_not_inputs, check_writable

__all__ = ["MARKER", "FolderSink", "ZipSink", "check_target", "export_identity", "read_identity", "staged_file",
           "staged_folder"]

# the file an export folder (or zip) holds to say that clipes export wrote it, of which run, in which format
MARKER = ".clipes-export.json"
# how a COCO JSON of clipes export begins: its identity is the first key of its info
COCO_HEAD = '{"info":{"clipes_export":'


def export_identity(fmt: str, run: Path) -> dict[str, str]:
    """What an export records of itself: the tool, the format and the run (its folder, resolved)."""
    return {"tool": "clipes export", "format": fmt, "run": str(run.resolve())}


def _identity(data: object) -> dict | None:
    ok = isinstance(data, dict) and data.get("tool") == "clipes export" and \
        all(isinstance(data.get(k), str) for k in ("format", "run"))
    return data if ok else None


def read_identity(out: Path) -> dict | None:
    """The identity an earlier export left at ``out`` (a folder's marker, a zip's marker member, a COCO JSON's
    info), or None when ``out`` is not something clipes export wrote. Reads only what it needs."""
    try:
        if out.is_dir():
            return _identity(json.loads((out / MARKER).read_text(encoding="utf-8")))
        if zipfile.is_zipfile(out):
            with zipfile.ZipFile(out) as archive:
                return _identity(json.loads(archive.read(MARKER)))
        with open(out, encoding="utf-8") as f:
            head = f.read(len(COCO_HEAD) + 4096)
        if head.startswith(COCO_HEAD):
            return _identity(json.JSONDecoder().raw_decode(head, len(COCO_HEAD))[0])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    return None


def check_target(out: Path, inputs: dict[str, Path], folder: bool, identity: dict[str, str], overwrite: bool = False,
                 what: str = "export") -> None:
    """Refuse an ``--out`` that is or lies inside any of ``inputs`` (the run, its photos, the files it read), or
    that cannot be written; links are not followed out of them (``check_not_inputs``).

    ``out`` may be new, an empty folder, or an earlier export of the same run and format (``identity``), which
    the export replaces; with ``overwrite``, any earlier clipes export and, for a file target, any file. A
    folder that clipes export did not write is never replaced.
    """
    check_not_inputs({"--out": out}, inputs)
    if not folder and out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name")
    if folder and out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the {what}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        found = read_identity(out)
        if found is None and (folder or not overwrite):
            if folder:
                names = sorted(p.name for p in out.iterdir())
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise OutputError(f"--out {out} holds other files ({shown}; not an earlier clipes export); clipes "
                                  "replaces only folders it wrote, even with --overwrite: choose an empty or new "
                                  "folder")
            raise OutputError(f"--out {out} is a file clipes export did not write; --overwrite replaces it, or "
                              "choose a new name")
        if found is not None and found != identity and not overwrite:
            raise OutputError(f"--out {out} holds the {found['format']} export of the run {found['run']}; "
                              "--overwrite replaces it, or choose another --out")
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
