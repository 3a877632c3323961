"""Work-directory checks shared by the trainers and the command line (no jax import)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def check_workdir(
    workdir: str | os.PathLike, *, fix: str = "pass a folder you can write to"
) -> Path:
    """Creates `workdir` and fails at start (not after hours) if it is not writable.

    `fix` ends the error message (the CLI names its flag). Every process of a
    multi-process run calls this at once on the same folder, so each writes and
    removes its own probe file (host name and pid in its name).
    """
    path = Path(workdir).expanduser()
    if str(path).startswith("gs://"):
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{socket.gethostname()}_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"work directory {path} is not writable ({e.strerror or e}); {fix}"
        ) from e
    return path
