"""Installing parti_jax where it runs: the wheel, constraints.txt and a Python 3.11 venv.

parti_jax is on no package index, and its pins (constraints.txt) are a Python 3.11
freeze, while TPU VM images ship Python 3.10. So the launchers ship the project
itself: `scripts/build_wheel.sh` builds `dist/parti_jax-<version>-py3-none-any.whl`
(gin files, tasks, launch and data assets inside the package) and copies
constraints.txt next to it, and a generated set-up script (`setup_script`)

1. makes a Python 3.11 virtual environment, with `PARTI_JAX_PYTHON` when given;
   otherwise with uv (installed with the system pip), whose `uv venv --python 3.11`
   uses a Python 3.11 it finds or downloads a standalone CPython 3.11; if uv cannot
   be installed, with `python3.11` on PATH;
2. installs `<wheel>[extras]` and the accelerator's jax (`jax[tpu]==<pin>`,
   `jax[cuda12]==<pin>` or `jax==<pin>`, the pin read from constraints.txt) with
   `pip install -c constraints.txt`, so every worker gets the tested versions;
3. checks that `import parti_jax, jax` works and `parti-jax --help` runs.

A stamp in the venv (hash of wheel and constraints, jax requirement, extras) makes
a repeat run a no-op. `launch tpu` copies wheel, constraints and script to every
worker; `launch slurm --venv=...` runs it once per job into a venv on the shared
filesystem; the Dockerfile installs the same wheel with the same constraints.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path

import parti_jax
from parti_jax.launch.common import LaunchError

VERSION = parti_jax.__version__
PYTHON_VERSION = "3.11"  # constraints.txt is a freeze of a Python 3.11 environment
UV_VERSION = "0.13.9"  # installed with the system pip when the worker has no uv
DIST_DIR = "dist"
REMOTE_DIR = "parti_jax"  # on a TPU worker, relative to $HOME: dist/ and venv/
# accelerator -> the jax requirement without its version (the pin comes from constraints.txt)
JAX_EXTRAS = {"tpu": "jax[tpu]", "cuda": "jax[cuda12]", "cpu": "jax"}
BUILD_HINT = "build it with `scripts/build_wheel.sh` (writes dist/<wheel> and dist/constraints.txt)"


def wheel_name(version: str = VERSION) -> str:
    return f"parti_jax-{version}-py3-none-any.whl"


def default_wheel() -> str:
    return str(Path(DIST_DIR) / wheel_name())


def pinned_version(constraints_text: str, package: str = "jax") -> str:
    """The `package==X` pin of a constraints file, or '' when it pins none."""
    m = re.search(rf"^{re.escape(package)}==([^\s;#]+)", constraints_text, re.MULTILINE)
    return m.group(1) if m else ""


def jax_requirement(accelerator: str, jax_version: str) -> str:
    if accelerator not in JAX_EXTRAS:
        raise LaunchError(f"accelerator {accelerator!r}: use one of {', '.join(JAX_EXTRAS)}")
    return f"{JAX_EXTRAS[accelerator]}=={jax_version}"


@dataclasses.dataclass(frozen=True)
class WorkerInstall:
    """What a worker installs and where (built by the tpu and slurm targets from their flags)."""

    wheel: str  # local path of the wheel; empty: dist/parti_jax-<version>-py3-none-any.whl
    constraints: str  # local path; empty: constraints.txt next to the wheel
    accelerator: str  # 'tpu', 'cuda' or 'cpu': which jax extra
    venv: str  # venv path on the worker (may start with $HOME)
    python: str = ""  # a Python 3.11 on the worker; empty: uv, then python3.11 on PATH
    jax: str = ""  # the whole jax requirement; empty: the accelerator's extra at the pin
    extras: str = ""  # parti_jax extras, e.g. 'data' (TensorFlow and SeqIO)

    @property
    def wheel_path(self) -> str:
        return os.path.abspath(self.wheel or default_wheel())

    @property
    def constraints_path(self) -> str:
        if self.constraints:
            return os.path.abspath(self.constraints)
        return str(Path(self.wheel_path).parent / "constraints.txt")

    def validate(self) -> WorkerInstall:
        if self.accelerator not in JAX_EXTRAS:
            raise LaunchError(
                f"accelerator {self.accelerator!r}: use one of {', '.join(JAX_EXTRAS)}"
            )
        if not Path(self.wheel_path).name.endswith(".whl"):
            raise LaunchError(f"--wheel {self.wheel!r} is not a .whl file; {BUILD_HINT}")
        if self.extras and not re.fullmatch(r"[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*", self.extras):
            raise LaunchError(f"--extras {self.extras!r}: write comma-separated extras, e.g. data")
        return self

    def check_files(self) -> None:
        """Raises LaunchError naming the missing wheel or constraints file and how to make it."""
        for label, path in (("wheel", self.wheel_path), ("constraints", self.constraints_path)):
            if not Path(path).is_file():
                raise LaunchError(
                    f"{label} file {path} does not exist; {BUILD_HINT}, or pass --{label}=PATH "
                    "(tpu: --no-install when the image already has parti_jax)"
                )

    def jax_line(self) -> str:
        """The jax requirement as far as known here (for comments in dry runs)."""
        if self.jax:
            return self.jax
        try:
            pin = pinned_version(Path(self.constraints_path).read_text())
        except OSError:
            pin = ""
        if pin:
            return jax_requirement(self.accelerator, pin)
        return f"{JAX_EXTRAS[self.accelerator]}==<the jax pin of constraints.txt>"


_SETTINGS = ("WHEEL", "CONSTRAINTS", "VENV", "PYTHON", "ACCELERATOR", "JAX", "EXTRAS")


def bash_value(value: str) -> str:
    """`value` quoted for bash, except a leading $HOME or $HERE, which expands."""
    for var in ("$HOME", "$HERE"):
        if value == var or value.startswith(var + "/"):
            rest = value[len(var) :]
            return f'"{var}"' + (shlex.quote(rest) if rest else "")
    return shlex.quote(value) if value else '""'


_BODY = r"""
say() { echo "parti-jax setup: $*" >&2; }
die() { say "$*"; exit 1; }
is_py311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }

[ -f "$WHEEL" ] || die "no wheel at $WHEEL: build it with scripts/build_wheel.sh and copy it here, or set PARTI_JAX_WHEEL"
[ -f "$CONSTRAINTS" ] || die "no constraints file at $CONSTRAINTS: copy constraints.txt next to the wheel, or set PARTI_JAX_CONSTRAINTS"
if [ -z "$JAX" ]; then
  jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$CONSTRAINTS")"
  [ -n "$jax_version" ] || die "$CONSTRAINTS pins no jax==VERSION; set PARTI_JAX_JAX"
  case "$ACCELERATOR" in
@JAX_CASES@
    *) die "PARTI_JAX_ACCELERATOR=$ACCELERATOR: use @ACCELERATORS@" ;;
  esac
fi
requirement="$WHEEL${EXTRAS:+[$EXTRAS]}"
key="$(cat "$WHEEL" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1) $JAX [$EXTRAS]"
stamp="$VENV/.parti_jax_setup"
if [ -x "$VENV/bin/parti-jax" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  say "$(basename "$WHEEL") and $JAX are already installed in $VENV"
  exit 0
fi

find_uv() {
  if command -v uv >/dev/null 2>&1; then command -v uv; return 0; fi
  if [ ! -x "$HOME/.local/bin/uv" ]; then
    say "installing uv $UV_VERSION with the system pip (python3 -m pip install --user)"
    python3 -m pip install --quiet --user "uv==$UV_VERSION" >&2 \
      || python3 -m pip install --quiet --user --break-system-packages "uv==$UV_VERSION" >&2 \
      || return 1
  fi
  [ -x "$HOME/.local/bin/uv" ] && echo "$HOME/.local/bin/uv"
}

make_venv() {
  if [ -x "$VENV/bin/python" ]; then
    is_py311 "$VENV/bin/python" \
      || die "$VENV has $("$VENV/bin/python" -V 2>&1), not Python 3.11: remove it or set PARTI_JAX_VENV"
    return 0
  fi
  mkdir -p "$(dirname "$VENV")"
  if [ -n "$PYTHON" ]; then
    is_py311 "$PYTHON" || die "PARTI_JAX_PYTHON=$PYTHON is not a Python 3.11"
    say "making $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
    return 0
  fi
  local uv
  if uv="$(find_uv)"; then
    say "making $VENV with uv (a Python 3.11 found on this machine, else a standalone CPython 3.11)"
    if "$uv" venv --quiet --seed --python 3.11 "$VENV"; then return 0; fi
    rm -rf "$VENV"
  fi
  if command -v python3.11 >/dev/null 2>&1 && is_py311 python3.11; then
    say "uv is not available: making $VENV with $(command -v python3.11)"
    python3.11 -m venv "$VENV"
    return 0
  fi
  die "no Python 3.11: uv could not be installed or fetch one, and python3.11 is not on PATH; set PARTI_JAX_PYTHON"
}

make_venv
say "installing $(basename "$requirement") and $JAX into $VENV with -c $CONSTRAINTS"
# A rebuilt wheel keeps its version number: remove the old one so pip installs the new.
"$VENV/bin/python" -m pip uninstall --quiet --yes parti_jax >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "$CONSTRAINTS" "$requirement" "$JAX"
"$VENV/bin/python" -c 'import jax, parti_jax; print("parti-jax setup: parti_jax", parti_jax.__version__, "jax", jax.__version__)' >&2
"$VENV/bin/parti-jax" --help >/dev/null
echo "$key" > "$stamp"
say "done: $VENV/bin/parti-jax"
"""


def setup_script(install: WorkerInstall, *, wheel: str, constraints: str, origin: str) -> str:
    """The standalone bash set-up script; `wheel` / `constraints` are where the worker finds
    them (a bare file name means: next to the script)."""
    install.validate()

    def located(path: str) -> str:
        return path if os.path.isabs(path) else f"$HERE/{path}"

    lines = [
        "#!/usr/bin/env bash",
        f"# Generated by `{origin}`: installs parti_jax {VERSION} from its wheel into a Python "
        f"{PYTHON_VERSION}",
        "# virtual environment, with the exact pins of constraints.txt and the accelerator's jax.",
        "# Each setting below can be overridden from the environment (PARTI_JAX_<NAME>), e.g.",
        "#   PARTI_JAX_PYTHON=/usr/bin/python3.11 PARTI_JAX_ACCELERATOR=cpu bash THIS_SCRIPT",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        f"WHEEL={bash_value(located(wheel))}  # the parti_jax wheel",
        f"CONSTRAINTS={bash_value(located(constraints))}  # exact pins (a Python 3.11 freeze)",
        f"VENV={bash_value(install.venv)}  # the virtual environment to make or update",
        f"PYTHON={bash_value(install.python)}  # a Python 3.11; empty: uv, then python3.11",
        f"ACCELERATOR={bash_value(install.accelerator)}  # tpu | cuda | cpu: the jax extra",
        f"JAX={bash_value(install.jax)}  # the jax requirement; empty: the extra at the pin",
        f"EXTRAS={bash_value(install.extras)}  # parti_jax extras, e.g. data",
        "for v in " + " ".join(_SETTINGS) + "; do  # PARTI_JAX_<NAME>, when set, wins",
        '  o="PARTI_JAX_$v"; if [ -n "${!o:-}" ]; then printf -v "$v" %s "${!o}"; fi',
        "done",
        f"UV_VERSION={UV_VERSION}",
    ]
    cases = "\n".join(f'    {a}) JAX="{req}==$jax_version" ;;' for a, req in JAX_EXTRAS.items())
    body = _BODY.lstrip("\n").replace("@JAX_CASES@", cases)
    body = body.replace("@ACCELERATORS@", " | ".join(JAX_EXTRAS))
    return "\n".join(lines) + "\n" + body
