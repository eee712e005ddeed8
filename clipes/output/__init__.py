"""What clipes writes: atomic files and the checks before writing (``files``), and the output folder of a
labelling run (``RunOutput``: its ``layout``, ``journal`` and ``lock``)."""

from .files import (
    OutputError,
    atomic_write,
    check_not_inputs,
    check_outside,
    check_writable,
    encode_image,
    entry_path,
    named_file,
)
from .lock import folder_lock, lock_state
from .run_output import RunOutput

__all__ = ["OutputError", "RunOutput", "atomic_write", "check_not_inputs", "check_outside", "check_writable",
           "encode_image", "entry_path", "folder_lock", "lock_state", "named_file"]
