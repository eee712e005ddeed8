"""What clipes writes, and where it may: atomic writes, and the checks every command runs before writing
(no output is an input or inside one, the folder is writable, a dataset's names stay inside its folder)."""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from PIL import Image

from ..errors import ClipesError

__all__ = ["OutputError", "atomic_write", "check_not_inputs", "check_outside", "check_writable", "encode_image",
           "entry_path", "named_file"]


class OutputError(ClipesError):
    """The output folder cannot be used as asked."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    The file is created with mode 0666 less the umask, as ``open()`` would, so others can read
    what clipes writes when the umask allows. An OS error (a full disk, a read-only folder)
    becomes an ``OutputError`` naming the file.
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def encode_image(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """An image file's bytes (PNG by default), ready for ``atomic_write``."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _same(a: Path, b: Path) -> bool:
    """One file or folder: the same path once links are followed, or two names (hard links) of one file."""
    return a == b or (a.exists() and b.exists() and os.path.samefile(a, b))


def _places(path: Path) -> list[Path]:
    """Where ``path`` is: as given (made absolute, links not followed) and once every link is followed.

    Both count: ``IMGS/linked.png``, a link to a photo elsewhere, is a file of the input folder all the
    same, and writing to it replaces the link the folder holds."""
    given, target = Path(os.path.abspath(path)), Path(os.path.realpath(path))
    return [given] if given == target else [given, target]


def _contains(folder: Path, path: Path) -> bool:
    return folder in path.parents and not folder.is_file()  # under a file: check_writable says so


def check_not_inputs(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None]) -> None:
    """The rule of what clipes writes, for every command: no output (a file, or a folder and all under it)
    is one of the command's inputs (files or folders, keyed by the flag that names them), lies inside an
    input folder or holds an input, and no two outputs are one file. Each path is compared both as given
    and with its links followed (see ``_places``). Checked before anything is written; the refusal names
    both flags."""
    outs = [(flag, p, _places(p)) for flag, p in outputs.items() if p is not None]
    ins = [(flag, p, _places(p)) for flag, p in inputs.items() if p is not None]
    for k, (oflag, out, o_places) in enumerate(outs):
        for flag, other, p_places in outs[:k]:
            if any(_same(ro, rp) or rp in ro.parents or ro in rp.parents for ro in o_places for rp in p_places):
                raise OutputError(f"{oflag} {out} and {flag} {other} are one place; give each its own")
        for flag, given, i_places in ins:
            pairs = [(ro, rp) for ro in o_places for rp in i_places]
            if any(_same(ro, rp) for ro, rp in pairs):
                raise OutputError(f"{oflag} {out} is {flag} {given}, an input; clipes never writes over its input")
            if any(_contains(rp, ro) for ro, rp in pairs):
                raise OutputError(f"{oflag} {out} is inside {flag} {given}; clipes never writes there")
            if any(_contains(ro, rp) for ro, rp in pairs):
                raise OutputError(f"{flag} {given} is inside {oflag} {out}, which clipes writes; move it or choose "
                                  f"another {oflag}")


def check_outside(images: Path, out: Path) -> None:
    """``check_not_inputs`` for an output folder and one input folder: clipes never writes into its input."""
    check_not_inputs({"--out": out}, {"the input folder": images})


def named_file(spec: str | Path | None) -> Path | None:
    """The file an option such as ``--classes`` or ``--model`` names (``ARCH:PATH`` too); None for a
    built-in name or a download."""
    if spec is None:
        return None
    text = str(spec)
    for cand in (text, text.split(":", 1)[-1]):
        if Path(cand).expanduser().is_file():
            return Path(cand).expanduser()
    return None


def entry_path(folder: Path, name: str, where: str) -> Path:
    """``folder / name`` for a name a dataset file gives (a COCO ``file_name``, a split file's line): a
    relative name that stays inside ``folder``, else refused naming the entry (its output would land on
    the image itself, or outside ``--out``)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
        raise OutputError(f"{where}: {name!r} is not a name inside {folder} (absolute or with '..'); clipes "
                          "takes only images inside the dataset's folder")
    return folder / PurePosixPath(*parts)


def check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be written (a file, a read-only place), writing nothing."""
    target = out
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if target.exists() and not target.is_dir():
        what = f"--out {out} is a file" if target == out else f"--out {out} cannot be made: {target} is a file"
        raise OutputError(what)
    if not os.access(target, os.W_OK | os.X_OK) or os.statvfs(target).f_flag & os.ST_RDONLY:
        raise OutputError(f"--out {out}: {target} is not writable")
