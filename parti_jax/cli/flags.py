"""Command-line flags and gin handling shared by every `parti-jax` subcommand.

Flags follow T5X: `--gin_file` (repeatable) names gin files, resolved first as
given, then against `--gin_search_path` entries, then against the gin folder
shipped inside the package (so `--gin_file=models/tiny.gin` works from any
directory); `--gin.BINDING=value` adds one binding, e.g.
`--gin.train.num_steps=100` or `--gin.ModelConfig.dropout_rate=0.0`.

Gin stays at the edges: library code never imports gin. This module parses
files and bindings with clear errors (the file or binding named, and the fix),
and writes the resulting config into the work directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from parti_jax import gin_reader


class UsageError(Exception):
    """A problem with the command line or gin config; printed without a traceback."""


def gin_dir() -> Path:
    """The gin folder shipped with parti_jax (see `gin_reader.shipped_gin_dir`)."""
    try:
        return gin_reader.shipped_gin_dir()
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e


@dataclasses.dataclass
class CommonArgs:
    gin_files: list[str]
    gin_bindings: list[str]
    gin_search_paths: list[str]
    workdir: str | None
    namespace: argparse.Namespace


def make_parser(prog: str, description: str, *, workdir: bool = True) -> argparse.ArgumentParser:
    """An argparse parser with the flags every subcommand shares."""
    parser = argparse.ArgumentParser(
        prog=f"parti-jax {prog}",
        description=description,
        epilog="Gin bindings: --gin.NAME=VALUE (e.g. --gin.train.num_steps=100). "
        "Shipped gin files: " + ", ".join(list_gin_files()[:8]) + ", ...",
    )
    parser.add_argument(
        "--gin_file",
        action="append",
        default=[],
        help="Gin file; repeatable. Relative names resolve against --gin_search_path "
        "and the gin folder shipped with parti_jax.",
    )
    parser.add_argument(
        "--gin_search_path", action="append", default=[], help="Extra folder for gin includes."
    )
    if workdir:
        parser.add_argument(
            "--workdir", default=None, help="Work directory (checkpoints, logs, config)."
        )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> CommonArgs:
    """Splits `--gin.X=Y` overrides from ordinary flags and parses the rest."""
    bindings: list[str] = []
    rest: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--gin."):
            body = arg[len("--gin.") :]
            if "=" not in body:
                # `--gin.X Y` form.
                if i + 1 >= len(argv):
                    raise UsageError(f"{arg}: a gin override needs a value: --gin.NAME=VALUE")
                body = f"{body}={argv[i + 1]}"
                i += 1
            name, value = body.split("=", 1)
            if not name:
                raise UsageError(f"{arg}: empty binding name; write --gin.NAME=VALUE")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
        i += 1
    ns = parser.parse_args(rest)
    return CommonArgs(
        gin_files=list(ns.gin_file),
        gin_bindings=bindings,
        gin_search_paths=list(ns.gin_search_path),
        workdir=getattr(ns, "workdir", None),
        namespace=ns,
    )


def list_gin_files() -> list[str]:
    """Every shipped gin file, relative to the gin folder."""
    root = gin_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.gin"))


def resolve_gin_file(name: str, search_paths: Sequence[str] = ()) -> str:
    """Finds a gin file as given, in the search paths, or in the shipped folder."""
    try:
        return str(gin_reader.resolve_gin_file(name, search_paths))
    except FileNotFoundError as e:
        raise UsageError(f"{e}. Shipped files: {', '.join(list_gin_files())}") from e


def setup_gin(args: CommonArgs, *, finalize: bool = True) -> None:
    """Registers configurables, parses gin files and bindings; errors name the culprit."""
    import gin
    from parti_jax.cli import configurables

    configurables.register_all()
    gin.clear_config()
    for p in [*args.gin_search_paths, str(gin_dir())]:
        gin.add_config_file_search_path(p)
    files = [resolve_gin_file(f, args.gin_search_paths) for f in args.gin_files]
    with _quiet_gin_path_probes():
        _parse(files, args.gin_bindings)
    if finalize:
        gin.finalize()


class _DropGinPathProbe(logging.Filter):
    # gin tries each `include` as a package resource before the search path and
    # logs "Path not found" at ERROR level for every miss; the include then
    # resolves normally. A real miss still raises (and is reported by us).
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


@contextlib.contextmanager
def _quiet_gin_path_probes():
    root = logging.getLogger()
    f = _DropGinPathProbe()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _parse(files: Sequence[str], bindings: Sequence[str]) -> None:
    import gin

    for f in files:
        try:
            gin.parse_config_file(f, skip_unknown=False)
        except (ValueError, KeyError, SyntaxError, TypeError, OSError) as e:
            raise UsageError(f"gin file {f}: {_first_line(e)}") from e
    for b in bindings:
        try:
            gin.parse_config(b)
        except (ValueError, KeyError, SyntaxError, TypeError) as e:
            raise UsageError(
                f"--gin.{b.replace(' = ', '=')}: {_first_line(e)} "
                "(values are gin literals: quote strings, e.g. --gin.train.task=\"'shapes_codes'\")"
            ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_workdir(workdir: str | os.PathLike) -> Path:
    """Creates the work directory and fails early (not after hours) if it is not writable."""
    from parti_jax.workdir import check_workdir as _check

    try:
        return _check(workdir, fix="pass --workdir with a folder you can write to")
    except PermissionError as e:
        raise UsageError(str(e)) from e


def write_config(workdir: str | os.PathLike, *, operative: bool = False) -> Path:
    """Writes the parsed (`config.gin`) or operative (`operative_config.gin`) gin config."""
    import gin

    name = "operative_config.gin" if operative else "config.gin"
    text = gin.operative_config_str() if operative else gin.config_str()
    path = Path(workdir) / name
    if _is_primary_process():
        path.write_text(text)
    return path


def _is_primary_process() -> bool:
    # Avoid starting a jax backend just to ask: only consult jax if it is loaded
    # and already initialised by the caller.
    jax = sys.modules.get("jax")
    if jax is None:
        return True
    try:
        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 - backend not ready; single process.
        return True


def run_main(fn: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> int:
    """Runs a subcommand body, turning usage errors into a one-line message and exit 2."""
    try:
        code = fn(argv)
    except UsageError as e:
        print(f"parti-jax: error: {e}", file=sys.stderr)
        return 2
    return int(code or 0)


# Shared pieces of the subcommand bodies (train, train-vqgan, train-upsampler,
# eval, sample, precompute-codes).

EXIT_PREEMPTED = 143  # a run told to stop (SIGTERM) saved and exits 128 + 15


def one_line(e: BaseException) -> str:
    """The first line of an error's message (its type name when empty)."""
    return _first_line(e)


@contextlib.contextmanager
def usage_errors(*errors: type[BaseException]) -> Iterator[None]:
    """Turns the given exception types into a one-line `UsageError` (exit 2)."""
    try:
        yield
    except errors as e:
        raise UsageError(one_line(e)) from e


@contextlib.contextmanager
def training_usage_errors() -> Iterator[None]:
    """`usage_errors` for a training run: bad config, unreadable files, a broken
    checkpoint or a non-finite loss end with one line instead of a traceback."""
    from parti_jax.train import checkpoints, loop

    with usage_errors(
        ValueError,
        PermissionError,
        FileNotFoundError,
        checkpoints.CheckpointError,
        loop.NonFiniteLossError,
    ):
        yield


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """--coordinator_address / --num_processes / --process_id (several processes)."""
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0.")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)


def init_distributed(ns: argparse.Namespace) -> None:
    """Starts jax.distributed from the flags or the environment; call before any jax use."""
    from parti_jax.train import distributed

    try:
        distributed.maybe_initialize_distributed(
            ns.coordinator_address, ns.num_processes, ns.process_id
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


def require_workdir_and_gin(args: CommonArgs, *, workdir_holds: str, gin_example: str) -> None:
    """Fails unless --workdir and at least one --gin_file are given."""
    if not args.workdir:
        raise UsageError(f"--workdir is required ({workdir_holds})")
    if not args.gin_files:
        raise UsageError(f"pass --gin_file (e.g. --gin_file={gin_example})")


def start_run(args: CommonArgs) -> Path:
    """Checks the work directory, parses gin and writes `config.gin` there."""
    workdir = check_workdir(args.workdir)
    setup_gin(args)
    write_config(workdir)
    return workdir


def start_distributed_run(args: CommonArgs, *, workdir_holds: str, gin_example: str) -> Path:
    """The training commands' start: required flags, jax.distributed, then `start_run`."""
    require_workdir_and_gin(args, workdir_holds=workdir_holds, gin_example=gin_example)
    init_distributed(args.namespace)  # before anything starts a jax backend
    return start_run(args)


def required_parameters(fn: Callable, given: Iterable[str] = ("workdir",)) -> list[str]:
    """Names of `fn`'s arguments without a default that the caller does not pass."""
    given = set(given)
    return [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is inspect.Parameter.empty and name not in given
    ]


def missing_bindings(scope: str, names: Iterable[str]) -> list[str]:
    """`scope.name` for each name that gin has no binding for."""
    import gin

    missing = []
    for name in names:
        try:
            gin.query_parameter(f"{scope}.{name}")
        except ValueError:
            missing.append(f"{scope}.{name}")
    return missing


def check_required_bindings(scope: str, names: Iterable[str]) -> None:
    """Fails with the unbound `scope.name`s and how to set them."""
    missing = missing_bindings(scope, names)
    if missing:
        raise UsageError(
            f"missing gin binding(s): {', '.join(missing)} "
            f"(set them in the gin file or with --gin.{scope}.NAME=VALUE)"
        )
