"""Size files without gin-config: the literal bindings of gin/models/*.gin and gin/vqgan/*.gin.

A bare accelerator host (jax, flax, optax, orbax; no gin-config) must still be
able to build `ModelConfig` and `VQGANConfig` from the shipped size files, so
that `python -m parti_jax.cli.benchmark` measures the same models there as
`parti-jax benchmark` does with gin. This module reads the subset of gin that
the size files use: comments, `include '...'`, `Name.param = <Python literal>`
(brackets may span lines) and macros (`NAME = literal`, used as `%NAME`).
Anything else is kept as a marker that becomes an error, naming the file and
line, only if a config reads it. `tests/test_benchmark.py` checks that it
builds the same configs as gin for every shipped size file.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.resources
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_INCLUDE = re.compile(r"""^include\s+(['"])(.+)\1$""")
_BINDING = re.compile(r"^([A-Za-z_][\w./]*)\.([A-Za-z_]\w*)\s*=\s*(.+)$", re.S)
_MACRO = re.compile(r"^([A-Za-z_]\w*)\s*=\s*(.+)$", re.S)


@dataclasses.dataclass(frozen=True)
class _Unparsed:
    """A binding whose value is not a Python literal (a reference, a call): needs gin-config."""

    text: str
    where: str


def shipped_gin_dir() -> Path:
    """The gin folder of the package (wheel: parti_jax/gin; editable: ./gin beside it)."""
    package = Path(str(importlib.resources.files("parti_jax")))
    for candidate in (package / "gin", package.parent / "gin"):
        if (candidate / "models").is_dir():
            return candidate
    raise FileNotFoundError(
        f"the gin folder shipped with parti_jax is missing (looked in {package})"
    )


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _depth(text: str) -> int:
    depth, quote = 0, None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
    return depth


def _statements(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each statement; brackets may span lines."""
    out, buffer, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        if not buffer:
            if not line.strip():
                continue
            start = number
        buffer = f"{buffer} {line.strip()}" if buffer else line.strip()
        if buffer.endswith("\\"):
            buffer = buffer[:-1]
            continue
        if _depth(buffer) <= 0:
            out.append((start, buffer))
            buffer = ""
    if buffer:
        raise ValueError(f"{path}:{start}: unbalanced brackets at the end of the file")
    return out


def resolve_gin_file(
    name: str, search_paths: Sequence[str] = (), including: Path | None = None
) -> Path:
    """A gin file as given, in the search paths, in the shipped folder, beside its includer."""
    candidates = [Path(name), *(Path(p) / name for p in search_paths), shipped_gin_dir() / name]
    if including is not None:
        candidates.append(including.parent / name)
    for c in candidates:
        if c.is_file():
            return c
    what = f"{including}: include {name!r}" if including else f"gin file {name!r}"
    raise FileNotFoundError(f"{what} not found (looked in {', '.join(map(str, candidates))})")


def read_gin_bindings(
    path: str | os.PathLike,
    search_paths: Sequence[str] = (),
    *,
    _macros: dict[str, Any] | None = None,
    _seen: tuple[Path, ...] = (),
) -> dict[str, dict[str, Any]]:
    """{configurable: {parameter: value}} of a gin file, following `include`s, without gin.

    Handles what the shipped size files use: comments, `include '...'`,
    `Name.param = <Python literal>` and macros (`NAME = literal`, used as
    `%NAME`). Later bindings win, as in gin. A value that is not a literal
    (`@ref()`, a scoped binding) is kept as a marker and becomes an error
    only if a config reads it (`config_from_bindings`).
    """
    path = Path(path)
    if not path.is_file():
        path = resolve_gin_file(str(path), search_paths)
    if path.resolve() in _seen:
        raise ValueError(f"{path}: include cycle ({' -> '.join(map(str, _seen))})")
    macros = {} if _macros is None else _macros
    out: dict[str, dict[str, Any]] = {}
    for number, text in _statements(path):
        where = f"{path}:{number}"
        include = _INCLUDE.match(text)
        if include:
            child = resolve_gin_file(include.group(2), search_paths, including=path)
            sub = read_gin_bindings(
                child, search_paths, _macros=macros, _seen=(*_seen, path.resolve())
            )
            for name, params in sub.items():
                out.setdefault(name, {}).update(params)
            continue
        if text.startswith(("import ", "from ")):
            continue
        binding = _BINDING.match(text)
        if binding:
            name, param, value = binding.groups()
            out.setdefault(name, {})[param] = _literal(value.strip(), macros, where)
            continue
        macro = _MACRO.match(text)
        if macro:
            macros[macro.group(1)] = _literal(macro.group(2).strip(), macros, where)
            continue
        raise ValueError(
            f"{where}: {text!r} is gin syntax the gin-free reader does not handle; "
            "install gin-config (pip install gin-config) to use this file"
        )
    return out


def parse_binding(text: str, where: str = "--gin") -> tuple[str, str, Any]:
    """'ModelConfig.d_model = 64' -> ('ModelConfig', 'd_model', 64)."""
    binding = _BINDING.match(text.strip())
    if not binding:
        raise ValueError(f"{where}: {text!r} is not a binding; write --gin.Name.param=value")
    name, param, value = binding.groups()
    return name, param, _literal(value.strip(), {}, where)


def _literal(text: str, macros: Mapping[str, Any], where: str) -> Any:
    if text.startswith("%") and text[1:] in macros:
        return macros[text[1:]]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return _Unparsed(text, where)


def config_from_bindings(
    cls: type, bindings: Mapping[str, Mapping[str, Any]], name: str = ""
) -> Any:
    """`cls(**bindings[name])`, with errors that name the parameter and where it was set."""
    name = name or cls.__name__
    params = dict(bindings.get(name, {}))
    fields = {f.name for f in dataclasses.fields(cls)}
    for param, value in params.items():
        if param not in fields:
            raise ValueError(
                f"{name}.{param}: no such field; {name} has {', '.join(sorted(fields))}"
            )
        if isinstance(value, _Unparsed):
            raise ValueError(
                f"{value.where}: {name}.{param} = {value.text} is not a Python literal; "
                "the gin-free reader needs literals (install gin-config for references)"
            )
    return cls(**params)
