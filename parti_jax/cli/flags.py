"""Command-line flags and gin handling shared by every `parti-jax` subcommand.

Flags follow T5X, so a T5X command line works unchanged: `--gin_file`
(repeatable) names gin files, found as given, then in the search path folders
(`--gin_search_path`, repeatable, or T5X's comma-separated `--gin_search_paths`),
then in the gin folder shipped inside the package (so `--gin_file=models/tiny.gin`
works from any directory). Bindings come as `--gin.NAME=VALUE` (e.g.
`--gin.train.batch_size=8`) or as T5X's `--gin_bindings='train.batch_size = 8'`
(repeatable, each a whole gin statement); they apply after the files, in the
order given. The gin macro `MODEL_DIR` is the work directory (`--workdir`, alias
`--model_dir`), bound before the files are parsed, so a gin file may say
`x.path = %MODEL_DIR`; a T5X-style `--gin.MODEL_DIR="'/run'"` names the work
directory when --workdir is not given. gin-config parses them. Gin stays at the
edges: library code never imports gin. Errors name the file or binding and the
fix, as one line (exit 2).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.resources
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from parti_jax import storage

EXIT_PREEMPTED = 143  # a run told to stop (SIGTERM) saved and exits 128 + 15
MODEL_DIR = "MODEL_DIR"  # the gin macro bound to --workdir (T5X binds it to --model_dir)


class UsageError(Exception):
    """A problem with the command line or gin config; printed without a traceback."""


def gin_dir() -> Path:
    """The gin folder shipped with parti_jax (wheel: parti_jax/gin; checkout: ./gin)."""
    package = Path(str(importlib.resources.files("parti_jax")))
    for candidate in (package / "gin", package.parent / "gin"):
        if (candidate / "models").is_dir():
            return candidate
    raise UsageError(f"the gin folder shipped with parti_jax is missing (looked in {package})")


def list_gin_files() -> list[str]:
    """Every shipped gin file, relative to the gin folder."""
    root = gin_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.gin"))


@dataclasses.dataclass
class CommonArgs:
    gin_files: list[str]
    gin_bindings: list[str]
    gin_search_paths: list[str]
    workdir: str | None
    namespace: argparse.Namespace
    kind: str = ""  # the subcommand ('train', 'sample', ...): the kind of work dir it writes
    # gin statement -> the flag that gave it, as typed (for error messages).
    binding_flags: dict[str, str] = dataclasses.field(default_factory=dict)


def make_parser(prog: str, description: str, *, workdir: bool = True) -> argparse.ArgumentParser:
    """An argparse parser with the flags every subcommand shares (T5X's spellings too:
    `--gin_bindings`, `--gin_search_paths`, `--model_dir`)."""
    parser = argparse.ArgumentParser(
        prog=f"parti-jax {prog}",
        description=description,
        epilog="Gin bindings: --gin.NAME=VALUE (e.g. --gin.train.batch_size=8) or "
        "--gin_bindings='NAME = VALUE'. Gin files may use %MODEL_DIR (the work directory). "
        "Shipped gin files: " + ", ".join(list_gin_files()[:8]) + ", ...",
    )
    parser.add_argument(
        "--gin_file",
        action="append",
        default=[],
        help="Gin file; repeatable. Relative names resolve against the search paths "
        "and the gin folder shipped with parti_jax.",
    )
    parser.add_argument(
        "--gin_search_path",
        action="append",
        default=[],
        help="Extra folder for gin files and includes; repeatable.",
    )
    parser.add_argument(
        "--gin_search_paths",
        dest="gin_search_path",
        action="extend",
        type=_comma_list,
        metavar="PATH[,PATH...]",
        help="Extra folders for gin files and includes, comma-separated (T5X's flag).",
    )
    parser.add_argument(
        "--gin_bindings",
        action="append",
        default=[],
        metavar="STATEMENT",
        help="A gin statement, e.g. --gin_bindings='train.batch_size = 8'; repeatable "
        "(T5X's flag). Applied after the gin files, in command-line order with --gin.NAME=VALUE.",
    )
    if workdir:
        parser.add_argument(
            "--workdir",
            "--model_dir",
            dest="workdir",
            default=None,
            help="Work directory (checkpoints, logs, config): a local folder or a URL such as "
            "gs://bucket/run. --model_dir is the same flag (T5X's name); gin files see it as "
            "%%MODEL_DIR.",
        )
    return parser


def _comma_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> CommonArgs:
    """Splits gin bindings (`--gin.X=Y`, `--gin.X Y`, `--gin_bindings=STATEMENT`, in the
    order given) from ordinary flags and parses the rest.

    A `MODEL_DIR` binding (T5X's way to name the run's folder) sets the work directory
    when the subcommand has --workdir and none was given; given both, they must agree.
    """
    bindings: list[str] = []
    sources: dict[str, str] = {}
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--gin_bindings" or arg.startswith("--gin_bindings="):
            given, value = "=" in arg, arg.partition("=")[2]
            if not given and (value := next(args, None)) is None:
                raise UsageError(
                    "--gin_bindings needs a gin statement: --gin_bindings='NAME = VALUE'"
                )
            if not value.strip():
                raise UsageError(f"{arg}: empty gin statement; write --gin_bindings='NAME = VALUE'")
            bindings.append(value)
            sources[value] = f"--gin_bindings={value!r}"
            continue
        if not arg.startswith("--gin."):
            rest.append(arg)
            continue
        name, given, value = arg.removeprefix("--gin.").partition("=")
        if not given and (value := next(args, None)) is None:
            raise UsageError(f"{arg}: a gin override needs a value: --gin.NAME=VALUE")
        if not name:
            raise UsageError(f"{arg}: empty binding name; write --gin.NAME=VALUE")
        bindings.append(f"{name} = {value}")
        sources[f"{name} = {value}"] = f"--gin.{name}={value}"
    ns = parser.parse_args(rest)
    for value in ns.gin_bindings or []:  # an abbreviated flag (--gin_bind=...) reached argparse
        bindings.append(value)
        sources[value] = f"--gin_bindings={value!r}"
    workdir = getattr(ns, "workdir", None)
    if hasattr(ns, "workdir"):
        workdir = _workdir_from_model_dir(workdir, bindings, sources)
        ns.workdir = workdir
    return CommonArgs(
        gin_files=list(ns.gin_file),
        gin_bindings=bindings,
        gin_search_paths=list(ns.gin_search_path),
        workdir=workdir,
        namespace=ns,
        kind=parser.prog.removeprefix("parti-jax "),
        binding_flags=sources,
    )


def _workdir_from_model_dir(
    workdir: str | None, bindings: Sequence[str], sources: dict[str, str]
) -> str | None:
    """--workdir, or the value of a `MODEL_DIR = '...'` binding (the last one) without it."""
    for statement in reversed(bindings):
        name, eq, value = statement.partition("=")
        if not eq or name.strip() != MODEL_DIR:
            continue
        flag = sources.get(statement, statement)
        try:
            model_dir = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            model_dir = None
        if not isinstance(model_dir, str) or not model_dir:
            raise UsageError(
                f"{flag}: MODEL_DIR must be a quoted folder name, e.g. "
                "--gin.MODEL_DIR=\"'/tmp/run'\" (or pass --workdir=/tmp/run)"
            )
        if workdir is not None and workdir != model_dir:
            raise UsageError(
                f"{flag} and --workdir={workdir} name different work directories; give one of them"
            )
        return model_dir
    return workdir


def setup_gin(args: CommonArgs, *, finalize: bool = True) -> None:
    """Registers configurables, binds `MODEL_DIR` (when there is a work dir), parses gin
    files and bindings; errors name the culprit.

    `MODEL_DIR` is bound before the files (they may refer to it) and again after them, so
    that a T5X-style `MODEL_DIR = %gin.REQUIRED` in a file does not erase it; the command
    line's own bindings come last. A file that never uses it is not affected.
    """
    import gin
    from parti_jax.cli import configurables

    configurables.register_all()
    gin.clear_config()
    for p in [*args.gin_search_paths, str(gin_dir())]:
        gin.add_config_file_search_path(p)
    model_dir = f"{MODEL_DIR} = {os.fspath(args.workdir)!r}" if args.workdir else None
    if model_dir:
        gin.parse_config(model_dir)
    with _quiet_gin_path_probes():
        for f in args.gin_files:
            try:
                gin.parse_config_file(f, skip_unknown=False)
            except (ValueError, KeyError, SyntaxError, TypeError, OSError) as e:
                raise UsageError(f"gin file {f}: {one_line(e)}") from e
    if model_dir:
        gin.parse_config(model_dir)
    for b in args.gin_bindings:
        try:
            gin.parse_config(b)
        except (ValueError, KeyError, SyntaxError, TypeError) as e:
            flag = args.binding_flags.get(b, f"--gin.{b.replace(' = ', '=')}")
            example = (
                "e.g. --gin_bindings=\"train.task = 'shapes_codes'\""
                if flag.startswith("--gin_bindings")
                else "e.g. --gin.train.task=\"'shapes_codes'\""
            )
            raise UsageError(
                f"{flag}: {one_line(e)} (values are gin literals: quote strings, {example})"
            ) from e
    if finalize:
        gin.finalize()


@contextlib.contextmanager
def _quiet_gin_path_probes() -> Iterator[None]:
    # gin tries each file as a package resource before the search path and logs
    # "Path not found" at ERROR level for every miss; the file then resolves
    # normally. A real miss still raises (and is reported by us).
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")

    logging.getLogger().addFilter(keep)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(keep)


def one_line(e: BaseException) -> str:
    """The first line of an error's message (its type name when empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


def run_main(fn: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> int:
    """Runs a subcommand body, turning usage errors into a one-line message and exit 2."""
    try:
        code = fn(argv)
    except UsageError as e:
        print(f"parti-jax: error: {e}", file=sys.stderr)
        return 2
    return int(code or 0)


# --------------------------------------------------------------- work dirs


def check_workdir(
    workdir: str | os.PathLike, kind: str | None = None, *, share: int | None = None
) -> storage.Path:
    """Creates the work directory and fails early (not after hours) if it is not writable
    (a local folder or a URL such as gs://bucket/run: parti_jax/storage.py).

    With `kind` (the subcommand) the run also claims it (`parti_jax.workdir.claim_workdir`):
    another kind's folder, or one that another run writes, is refused before anything is
    written. Of several processes, process 0 takes the lock and the others wait for its
    outcome (and fail with its error); `share`: a share of a job split by hand (eval's
    --process_index), where share 0 alone takes the lock.
    """
    from parti_jax import workdir as W

    fix = "pass --workdir with a folder you can write to"
    with usage_errors(PermissionError, ValueError):  # ValueError: tensorstore's I/O errors
        if kind is None:
            return W.check_workdir(workdir, fix=fix)
        client = None
        if "jax" in sys.modules:  # several processes only once jax.distributed started
            from parti_jax.train import distributed

            client = distributed._client()
        process0 = W.is_primary()
        key = f"parti_jax/workdir_claim/{os.fspath(workdir)}"  # as given: the same on every host
        wait = client is not None and not process0
        outcome = client.blocking_key_value_get(key, 600_000) if wait else "ok"
        if outcome != "ok":  # process 0's refusal
            raise W.WorkdirError(outcome)
        try:
            path = W.claim_workdir(workdir, kind, primary=process0 and not share, fix=fix)
        except PermissionError as e:
            if client is not None and process0:
                client.key_value_set(key, one_line(e), allow_overwrite=True)
            raise
        if client is not None and process0:
            client.key_value_set(key, "ok", allow_overwrite=True)
        return path


def write_config(workdir: str | os.PathLike, *, operative: bool = False) -> storage.Path:
    """Writes the parsed (`config.gin`) or operative (`operative_config.gin`) gin config
    from the first process (atomically: a reader never sees half of it)."""
    import gin
    from parti_jax.workdir import is_primary

    name = "operative_config.gin" if operative else "config.gin"
    path = storage.path(storage.join(workdir, name))
    if is_primary():
        storage.write_text(path, gin.operative_config_str() if operative else gin.config_str())
    return path


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """--coordinator_address / --num_processes / --process_id (several processes)."""
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0.")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)


def init_distributed(ns: argparse.Namespace) -> None:
    """Starts jax.distributed from the flags or the environment; call before any jax use."""
    from parti_jax.train import distributed

    with usage_errors(ValueError):
        distributed.maybe_initialize_distributed(
            ns.coordinator_address, ns.num_processes, ns.process_id
        )


def start_run(args: CommonArgs, *, share: int | None = None) -> storage.Path:
    """Claims the work directory for the subcommand (`check_workdir`), parses gin and
    writes `config.gin` there."""
    workdir = check_workdir(args.workdir, args.kind or None, share=share)
    setup_gin(args)
    write_config(workdir)
    return workdir


def start_distributed_run(
    args: CommonArgs, *, workdir_holds: str, gin_example: str
) -> storage.Path:
    """A run's start: --workdir and a --gin_file required, jax.distributed, then `start_run`."""
    if not args.workdir:
        raise UsageError(f"--workdir is required ({workdir_holds})")
    if not args.gin_files:
        raise UsageError(f"pass --gin_file (e.g. --gin_file={gin_example})")
    init_distributed(args.namespace)  # before anything starts a jax backend
    return start_run(args, share=getattr(args.namespace, "process_index", None))


# ---------------------------------------------------------- gin bindings


def is_bound(name: str) -> bool:
    """Whether gin has a binding for `scope.parameter`."""
    import gin

    try:
        gin.query_parameter(name)
    except ValueError:
        return False
    return True


def required_parameters(fn: Callable, given: Iterable[str] = ("workdir",)) -> list[str]:
    """Names of `fn`'s arguments without a default that the caller does not pass."""
    given = set(given)
    return [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is inspect.Parameter.empty and name not in given
    ]


def check_required_bindings(scope: str, names: Iterable[str], fix: str | None = None) -> None:
    """Fails with the unbound `scope.name`s and how to set them (`fix`, else a gin hint)."""
    missing = [f"{scope}.{n}" for n in names if not is_bound(f"{scope}.{n}")]
    if missing:
        fix = fix or f"set them in the gin file or with --gin.{scope}.NAME=VALUE"
        raise UsageError(f"missing gin binding(s): {', '.join(missing)} ({fix})")


def add_model_dir_flags(parser: argparse.ArgumentParser) -> None:
    """--t2i / --vqgan / --upsampler: the work directories `sample` and `export` read."""
    for flag, what in (("t2i", "Encoder-decoder"), ("vqgan", "VQGAN"), ("upsampler", "Upsampler")):
        parser.add_argument(f"--{flag}", default=None, help=f"{what} work directory.")


def model_dir_kwargs(ns: argparse.Namespace, *others: str) -> dict[str, Any]:
    """`t2i_path` / `vqgan_path` / `upsampler_path` (and `others`) from the flags given."""
    names = {f"{n}_path": n for n in ("t2i", "vqgan", "upsampler")} | {n: n for n in others}
    return {k: getattr(ns, n) for k, n in names.items() if getattr(ns, n) is not None}
