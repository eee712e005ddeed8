"""The third hostile trial (issue 19): outputs that are inputs, flags not honoured, a lock that outlived its
run, runs that could not be scored, tracebacks. Each case ends in one clear ``error:`` line or a correct
result, and the inputs are byte-identical afterwards."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from clipes.output import OutputError, folder_lock

from .conftest import lock_held_elsewhere


def _digests(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (or the file itself) by content: inputs must come out byte-identical."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------- item 3: the lock never outlives its run

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_runs_lock_is_not_held_by_its_orphaned_dataloader_worker(tmp_path, capsys):
    """kill -9 of a run whose DataLoader worker lives on: the next run takes the folder, with a note
    (a flock, shared with the forked worker, refused it for as long as the worker lived)."""
    out = tmp_path / "out"
    with lock_held_elsewhere(out, worker=True) as (run, workers):
        assert workers and all(_alive(w) for w in workers)
        with pytest.raises(OutputError, match=f"another clipes run \\(pid {run.pid}\\)"), folder_lock(out):
            pass  # held while the run lives
        run.kill()
        run.wait()
        time.sleep(0.2)
        assert all(_alive(w) for w in workers)  # the orphaned worker still runs
        with folder_lock(out):
            assert (out / ".clipes" / "lock").read_text() == f"pid {os.getpid()}\n"
        assert f"(pid {run.pid}) was stopped before it finished; taking over its lock" in \
            " ".join(capsys.readouterr().err.split())
    assert (out / ".clipes" / "lock").read_text() == ""  # released in order: no note next time
    with folder_lock(out):
        pass
    assert "taking over" not in capsys.readouterr().err
