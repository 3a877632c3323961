"""The work-directory check that every process of a multi-process run makes at start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from parti_jax.cli import flags
from parti_jax.workdir import check_workdir

_LOOP = (
    "import sys\n"
    "from parti_jax.workdir import check_workdir\n"
    "for _ in range(300):\n"
    "    check_workdir(sys.argv[1])\n"
)


def test_processes_checking_one_workdir_at_once_do_not_collide(tmp_path):
    # Regression: a shared probe name let one process delete the other's probe
    # ("not writable (No such file or directory)") when a launcher restarted both.
    workdir = tmp_path / "run"
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOOP, str(workdir)], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert list(workdir.iterdir()) == []  # no probe files left behind


def test_unwritable_workdir_names_the_folder_and_the_fix(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=r"a_file/run is not writable"):
        check_workdir(blocker / "run")
    with pytest.raises(flags.UsageError, match=r"a_file/run is not writable.*pass --workdir"):
        flags.check_workdir(blocker / "run")
