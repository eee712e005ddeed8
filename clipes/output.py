"""The output folder of a labelling run: atomic writes, a record of what made each output, one writer.

Every image's outputs are followed by one line in a journal (``.clipes/records.jsonl``) that says
what they were made from: the input file (name, size, modification time), the labels given, the
run's settings, and the bytes of each file written. A rerun skips an image only when all of that
still holds and every file is whole, so the record is exactly as durable as the files, an image
replaced in place is redone, and outputs of different settings or inputs never mix.
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from rich.console import Console

from .errors import ClipesError
from .masks import mask_to_png, overlay
from .provenance import settings_key

if TYPE_CHECKING:  # a run folder is read and checked without torch (eval, view, export, checks before the model)
    from .labeler import LabelResult

__all__ = ["OutputError", "RunOutput", "atomic_write", "check_not_inputs", "check_outside", "check_writable",
           "encode_image", "entry_path", "folder_lock", "lock_state", "named_file"]

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: runs are not locked
    fcntl = None


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


def _take_lock(folder: Path) -> IO[str] | None:
    """Lock ``folder`` for this process (``folder/.clipes/lock``), or say who holds it; None without fcntl.

    The lock is a POSIX record lock (``lockf``): it belongs to this process alone, so the DataLoader
    workers it forks do not hold it (a ``flock`` is shared with them and outlived a killed run while
    an orphaned worker lived), and the kernel drops it when the process ends, however it ends. The
    file names the holder while it runs and is emptied on release: a name left in it is a run that
    was killed, whose lock is taken over with a note.
    """
    if fcntl is None:
        return None
    path = folder / RunOutput.STATE / "lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until released
    except OSError as e:
        raise OutputError(f"cannot write to {folder}: {e.strerror or e}") from e
    try:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise OutputError(f"{folder} is being written by another clipes run ({holder}); wait for it to "
                              "finish or choose another --out") from None
        raise OutputError(f"cannot lock {folder} for this run: {e.strerror or e}; choose an --out on a "  # no locks
                          "local disk") from e
    f.seek(0)
    left = f.read().split()
    if len(left) == 2 and left[0] == "pid" and left[1].isdigit() and int(left[1]) != os.getpid():
        Console(stderr=True).print(f"note: the run that held {folder} (pid {left[1]}) was stopped before it "
                                   "finished; taking over its lock", highlight=False, soft_wrap=True, markup=False)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def lock_state(folder: Path) -> str | None:
    """How ``folder``'s writer left it, reading only: "held (pid N)" while a run writes it, "stopped (pid N)"
    when the run that held it was killed, None when it ended in order (or no run ever locked it)."""
    path = folder / RunOutput.STATE / "lock"
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:
        return None
    with f:
        holder = " ".join(f.read().split())
        if fcntl is not None:
            try:  # a shared lock, taken and let go at once: refused while a writer holds the folder
                fcntl.lockf(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.lockf(f.fileno(), fcntl.LOCK_UN)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    return f"held ({holder or 'another process'})"
    return f"stopped ({holder})" if holder else None


def _release_lock(held: IO[str] | None) -> None:
    """Empty the lock file (this run ended in order) and let go of the lock."""
    if held is None:
        return
    try:
        held.seek(0)
        held.truncate()
    except OSError:
        pass  # the lock goes with the file's closing all the same
    held.close()


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One writer at a time in ``folder``: a second clipes run into it is refused with a message."""
    held = _take_lock(folder)
    try:
        yield
    finally:
        _release_lock(held)


def _written(rec: dict[str, Any]) -> int:
    """When a journal record was written (ns since the epoch; 0 if it does not say)."""
    t = rec.get("written_ns")
    return t if isinstance(t, int) else 0


def _ends_mid_line(path: Path) -> bool:
    """Whether a non-empty file's last byte is not a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


# what each kind of output is called, relative to the run folder
_KINDS = {"mask": ("masks", ".png"), "cams": ("cams", ".npz"), "overlay": ("overlays", ".jpg")}
# files derived from the masks: stale once the masks are redone from scratch
_DERIVED = ("labels.json", "manifest.json", "eval.json", "eval_iou.png")


class RunOutput:
    """``masks/``, ``cams/``, ``overlays/``, ``labels.json``, ``manifest.json`` and the journal under one folder.

    Construction only reads: it loads what earlier runs recorded and refuses a folder made with
    other ``settings`` (what shapes the masks, compared by meaning) unless ``overwrite``.
    ``open()``, once the inputs and the model have checked out, takes the folder's lock (one
    writer at a time; torchrun ranks of one job share it), clears it for ``overwrite`` and
    starts this process's journal.
    """

    MANIFEST = "manifest.json"
    LABELS = "labels.json"
    STATE = ".clipes"

    def __init__(self, root: Path, settings: dict[str, Any], *, save_cams: bool = False,
                 overlays: bool = False, overwrite: bool = False, rank: int = 0, world: int = 1) -> None:
        self.root = root
        self.save_cams = save_cams
        self.overlays = overlays
        self.overwrite = overwrite
        self.settings = settings
        self.key = settings_key(settings)
        self.rank, self.world = rank, world
        self.records: dict[str, dict[str, Any]] = {}
        self._journal: IO[str] | None = None
        self._lock: IO[str] | None = None
        self._mutex = threading.Lock()
        if not overwrite:
            self.records = self._read_records()
            self._check_settings()

    # ----------------------------------------------------------------- reading
    def _journals(self) -> list[Path]:
        state = self.root / self.STATE
        return [state / "records.jsonl", *sorted(state.glob("records.rank*.jsonl"))]

    def _read_records(self) -> dict[str, dict[str, Any]]:
        """The latest record of every image in the journals; a line cut short by a kill is passed over.

        Latest by the time each record holds, not by journal: a torchrun job killed before its merge
        leaves per-rank journals that are older than what a later run appends to the main one.
        """
        records: dict[str, dict[str, Any]] = {}
        for path in self._journals():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as e:
                raise OutputError(f"{path}: unreadable run record ({e}); use --overwrite or another --out") from e
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("stem"), str):
                    seen = records.get(rec["stem"])
                    if seen is None or _written(rec) >= _written(seen):
                        records[rec["stem"]] = rec
        return records

    def _check_settings(self) -> None:
        manifest = self.root / self.MANIFEST
        refuse = "use --overwrite to redo it or choose another --out"
        if manifest.exists():
            try:
                previous = json.loads(manifest.read_text(encoding="utf-8")).get("settings", {})
                if not isinstance(previous, dict):
                    raise ValueError("'settings' is not a mapping")
            except (ValueError, OSError, AttributeError) as e:
                raise OutputError(f"{manifest}: unreadable manifest ({e}); use --overwrite or another --out") from e
            changed = sorted(k for k in self.settings.keys() | previous.keys()
                             if self.settings.get(k) != previous.get(k))
            if changed:
                raise OutputError(f"{self.root} holds a run made with other settings ({', '.join(changed)}); {refuse}")
        if any(rec.get("settings") != self.key for rec in self.records.values()):
            raise OutputError(f"{self.root} holds outputs made with other settings (recorded in "
                              f"{self.STATE}/, its manifest.json is missing or edited); {refuse}")
        # masks without a record nor a manifest (which a run writes before its first mask) are not clipes'
        # own; with the manifest they are the first masks of a run killed before their records: redone
        masks = self.root / "masks"
        if not self.records and not manifest.exists() and masks.is_dir() and \
                any(p.is_file() for p in masks.rglob("*.png")):
            raise OutputError(f"{self.root} holds masks that no clipes run recorded; {refuse}")

    def path(self, kind: str, stem: str) -> Path:
        folder, suffix = _KINDS[kind]
        return self.root / folder / f"{stem}{suffix}"

    def mask_path(self, stem: str) -> Path:
        return self.path("mask", stem)

    def cams_path(self, stem: str) -> Path:
        return self.path("cams", stem)

    def overlay_path(self, stem: str) -> Path:
        return self.path("overlay", stem)

    def _wanted(self) -> list[str]:
        return ["mask"] + ["cams"] * self.save_cams + ["overlay"] * self.overlays

    def is_done(self, stem: str, stamp: dict[str, Any], given: list[str] | None) -> bool:
        """Whether an earlier run wrote, whole, everything this run would write for ``stem``, from the
        same input file (``stamp``), the same given labels (None: inferred) and the same settings."""
        rec = self.records.get(stem)
        if rec is None or self.overwrite or rec.get("settings") != self.key or rec.get("input") != stamp \
                or rec.get("given") != given:
            return False
        outputs = rec.get("outputs", {})
        for kind in self._wanted():
            path = self.path(kind, stem)
            try:
                if kind not in outputs or path.stat().st_size != outputs[kind]:
                    return False  # missing, truncated or replaced
            except OSError:
                return False
        return True

    # ----------------------------------------------------------------- writing
    def open(self) -> None:
        """Start writing: lock the folder (rank 0), clear it for ``overwrite`` (rank 0), open the journal.

        Under torchrun, rank 0 opens first and the others after it (see ``clipes.run``).
        """
        state = self.root / self.STATE
        try:
            state.mkdir(parents=True, exist_ok=True)
            if self.rank == 0:
                self._lock = _take_lock(self.root)
                if self.overwrite:
                    self._clear()
            name = "records.jsonl" if self.world == 1 else f"records.rank{self.rank}.jsonl"
            self._journal = open(state / name, "a", encoding="utf-8")  # noqa: SIM115 - held for the run
            if _ends_mid_line(state / name):  # a kill cut the last line: the next record starts on its own
                self._journal.write("\n")
        except OSError as e:
            self.close()
            raise OutputError(f"cannot write to {self.root}: {e.strerror or e}") from e

    def _clear(self) -> None:
        """``overwrite``: remove every output and record of earlier runs, and what was derived from them."""
        for folder, suffix in _KINDS.values():
            base = self.root / folder
            if not base.is_dir():
                continue
            for p in sorted(base.rglob("*"), reverse=True):
                if p.is_file() and (p.suffix == suffix or p.name.endswith(".tmp")):
                    p.unlink()
                elif p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
            if not any(base.iterdir()):
                base.rmdir()
        for name in _DERIVED:
            (self.root / name).unlink(missing_ok=True)
        shutil.rmtree(self.root / "view", ignore_errors=True)
        for path in self._journals():
            path.unlink(missing_ok=True)
        self.records = {}

    def write(self, stem: str, result: LabelResult, class_names: tuple[str, ...],
              stamp: dict[str, Any], given: list[str] | None, image: Image.Image | None = None) -> None:
        """Write one image's outputs, then its record; drop outputs of kinds this run does not make."""
        files: dict[str, bytes] = {}
        if self.save_cams:
            buf = io.BytesIO()
            arrays = {"labels": result.labels.astype(np.int64), "cam": result.cam.astype(np.float32),
                      "cam_refined": result.cam_refined.astype(np.float32)}
            if result.confidence is not None:
                arrays["confidence"] = result.confidence.astype(np.float32)
            np.savez_compressed(buf, **arrays)
            files["cams"] = buf.getvalue()
        if self.overlays and image is not None:
            names = {int(c) + 1: class_names[int(c)] for c in result.labels}
            files["overlay"] = encode_image(overlay(image, result.mask, names), "JPEG", quality=90)
        files["mask"] = encode_image(mask_to_png(result.mask))
        for kind in _KINDS:
            if kind not in files:
                self.path(kind, stem).unlink(missing_ok=True)  # an older result of this image
        for kind, data in files.items():
            atomic_write(self.path(kind, stem), data)
        rec = {"stem": stem, "written_ns": time.time_ns(), "settings": self.key, "input": stamp, "given": given,
               "labels": [class_names[i] for i in result.labels], "source": result.label_source,
               "outputs": {kind: len(data) for kind, data in files.items()}}
        if result.scores:
            rec["scores"] = result.scores
        if result.threshold is not None:
            rec["threshold"] = round(result.threshold, 8)
        line = json.dumps(rec) + "\n"
        with self._mutex:
            if self._journal is None:
                raise RuntimeError("RunOutput.open() must come before write()")
            try:
                self._journal.write(line)
                self._journal.flush()  # in the kernel's hands: survives the process being killed
            except OSError as e:
                raise OutputError(f"cannot write {self.root / self.STATE}: {e.strerror or e}") from e
            self.records[stem] = rec

    def _labels_bytes(self, records: dict[str, dict[str, Any]]) -> bytes:
        labels = {}
        for stem, rec in sorted(records.items()):
            if not self.mask_path(stem).is_file():
                continue
            entry: dict[str, Any] = {"labels": rec["labels"], "source": rec["source"], "file": rec["input"]["file"]}
            if "scores" in rec:
                entry["scores"] = rec["scores"]
            if "threshold" in rec:
                entry["threshold"] = rec["threshold"]
            labels[stem] = entry
        return (json.dumps(labels, indent=1) + "\n").encode()

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.root / self.MANIFEST,
                     (json.dumps({**manifest, "settings": self.settings}, indent=1) + "\n").encode())

    def flush(self, manifest: dict[str, Any]) -> None:
        """Save progress for people reading the folder during a run (the journal is what resumes)."""
        if self.world > 1:
            return
        with self._mutex:
            records = dict(self.records)
        atomic_write(self.root / self.LABELS, self._labels_bytes(records))
        self._write_manifest(manifest)

    def close_journal(self) -> None:
        """No more writes from this process (the lock stays until ``close``)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def close(self) -> None:
        """Close the journal and release the lock."""
        self.close_journal()
        _release_lock(self._lock)
        self._lock = None

    def finalize(self, manifest: dict[str, Any]) -> None:
        """Rank 0 once every rank has closed its journal: one compact journal, ``labels.json`` and the manifest."""
        records = self._read_records()
        state = self.root / self.STATE
        atomic_write(state / "records.jsonl", "".join(json.dumps(r) + "\n" for _, r in sorted(records.items()))
                     .encode())
        for path in self._journals()[1:]:
            path.unlink(missing_ok=True)
        atomic_write(self.root / self.LABELS, self._labels_bytes(records))
        self._write_manifest(manifest)
