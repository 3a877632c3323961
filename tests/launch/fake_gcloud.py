"""A fake `gcloud` for the TPU driver script tests: one queued resource whose workers are
this machine. `tpu-vm ssh` runs the command with $FAKE_HOME as the worker's home and
working directory, `tpu-vm scp` copies into it, and the first $PREEMPTIONS runs of the
training command are "preempted" (the resource turns SUSPENDED)."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

FAKE_GCLOUD = textwrap.dedent(
    """\
    #!/bin/bash
    echo "$*" >> "$FAKE_DIR/calls"
    home="${FAKE_HOME:-$FAKE_DIR/home}"
    mkdir -p "$home"
    cmd=""
    for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
    case "$3 $4" in
      "queued-resources create") echo ACTIVE > "$FAKE_DIR/state"; exit 0 ;;
      "queued-resources describe") cat "$FAKE_DIR/state" 2>/dev/null; exit 0 ;;
      "queued-resources delete") rm -f "$FAKE_DIR/state"; exit 0 ;;
      "tpu-vm scp")
        files=()
        for a in "${@:5}"; do case "$a" in --*) ;; *) files+=("$a") ;; esac; done
        dest="${files[-1]#*:}"
        unset 'files[-1]'
        cp "${files[@]}" "$home/$dest"; exit $? ;;
      "tpu-vm ssh")
        if [[ "$cmd" == *PARTI_JAX_NUM_PROCESSES* ]]; then
          n=$(cat "$FAKE_DIR/runs" 2>/dev/null || echo 0)
          echo $((n + 1)) > "$FAKE_DIR/runs"
          if (( n < PREEMPTIONS )); then echo SUSPENDED > "$FAKE_DIR/state"; exit 255; fi
        fi
        cd "$home" && HOME="$home" bash -c "$cmd"; exit $? ;;
    esac
    exit 1
    """
)


def fake_gcloud_env(fake_dir: Path, *, preemptions: int = 0, home: Path | None = None) -> dict:
    """Writes the fake into `fake_dir` and returns an environment that puts it first on PATH."""
    fake_dir.mkdir(parents=True, exist_ok=True)
    gcloud = fake_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{fake_dir}:{os.environ['PATH']}", FAKE_DIR=str(fake_dir))
    env["PREEMPTIONS"] = str(preemptions)
    env["FAKE_HOME"] = str(home or fake_dir / "home")
    return env


def calls(fake_dir: Path) -> list[str]:
    path = fake_dir / "calls"
    return path.read_text().splitlines() if path.exists() else []
