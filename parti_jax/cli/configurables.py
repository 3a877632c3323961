"""Registers library functions and config dataclasses with gin.

This is the only place (with the subcommand modules) where gin meets library
code: library modules never import gin. Names registered here are what gin
files bind, e.g. `ModelConfig.d_model = 1024` or `train/LoopConfig.num_steps = 1000`.
Nothing registered here may import TensorFlow at module level.

Every configurable is registered checked (`_register`): when gin calls it, each
argument that a binding supplied is checked against the annotation of the
function (or dataclass field) first, so `train.batch_size = '8'` fails with
one line naming the binding before anything is built (`BindingError`, a
ValueError: the subcommands print it as one line, exit 2). Range checks live
with the code (config `__post_init__`s, the entry points' own checks).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import inspect
import numbers
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import gin

_REGISTERED = False

# gin name -> 'module:attribute'. Each trainer takes `loop = @<trainer>/LoopConfig()`:
# bindings scoped by the trainer's name (`train/LoopConfig.num_steps = 1000`) apply to
# it alone, unscoped `LoopConfig.<field>` bindings to all. Trainers with two optimizers
# take scoped ones: `train_vqgan.generator_optimizer = @generator/adamw_optimizer()`.
# MeshConfig.rules selects the rule table by name ('data_parallel', 'fsdp', 'fsdp_tp');
# HardwareTarget is the machine a run file is written for (`parti-jax benchmark memory`);
# ShapesWorldConfig the shapes world (e.g. `register_shapes_task.config`, so that a task
# draws scenes at the VQGAN's resolution instead of resizing them). WriterConfig chooses
# a trainer's metric writers: `LoopConfig.writers = @WriterConfig()` with, e.g.,
# `WriterConfig.wandb = True` (TensorBoard and Weights & Biases besides metrics.jsonl).
_CONFIGURABLES = {
    "ModelConfig": "parti_jax.models.config:ModelConfig",
    "MeshConfig": "parti_jax.partitioning:MeshConfig",
    "train": "parti_jax.train.t2i:train",
    "LoopConfig": "parti_jax.train.loop:LoopConfig",
    "WriterConfig": "parti_jax.train.metrics:WriterConfig",
    "OptimizerConfig": "parti_jax.train.optimizers:OptimizerConfig",
    "VQGANConfig": "parti_jax.vqgan.config:VQGANConfig",
    "LossConfig": "parti_jax.vqgan.losses:LossConfig",
    "DiscriminatorConfig": "parti_jax.vqgan.discriminator:DiscriminatorConfig",
    "train_vqgan": "parti_jax.vqgan.train:train_vqgan",
    "UpsamplerConfig": "parti_jax.upsampler.config:UpsamplerConfig",
    "train_upsampler": "parti_jax.upsampler.train:train_upsampler",
    "ContrastiveConfig": "parti_jax.contrastive.model:ContrastiveConfig",
    "train_contrastive": "parti_jax.contrastive.train:train_contrastive",
    "SamplingConfig": "parti_jax.decoding:SamplingConfig",
    "sample": "parti_jax.sampling:sample_to_folder",
    "ShapesWorldConfig": "parti_jax.data.shapes:ShapesWorldConfig",
    "HardwareTarget": "parti_jax.memory:HardwareTarget",
    "LaunchSpec": "parti_jax.launch:LaunchSpec",
    "TpuTarget": "parti_jax.launch.tpu:TpuTarget",
    "GkeTarget": "parti_jax.launch.gke:GkeTarget",
    "SlurmTarget": "parti_jax.launch.slurm:SlurmTarget",
    "LocalTarget": "parti_jax.launch.local:LocalTarget",
}

# Functions that import TensorFlow: gin sees a wrapper that imports the module only when
# called, so a gin file can say `train.task = @register_codes_task()` and subcommands that
# never build a task stay TensorFlow-free. Each takes the arguments of the function named.
_LAZY = {
    "register_shapes_task": "parti_jax.tasks:register_shapes_task",
    "register_coco_task": "parti_jax.tasks:register_coco_task",
    "register_folder_task": "parti_jax.tasks:register_folder_task",
    "register_webdataset_task": "parti_jax.tasks:register_webdataset_task",
    "register_parquet_task": "parti_jax.tasks:register_parquet_task",
    "register_codes_task": "parti_jax.tasks:register_codes_task",
    "register_mixture": "parti_jax.tasks:register_mixture",
    "precompute_codes": "parti_jax.vqgan.precompute:precompute_codes",
}

# Entry points whose listed arguments the CLI passes (gin may not bind them).
_PASSED_BY_CLI = {
    "eval": (
        "parti_jax.eval.runner:run_eval_suites",
        ["workdir", "suite_fns", "process_index", "process_count", "inputs"],
    ),
    "demo": (
        "parti_jax.demo:run_demo",
        ["workdir", "fns", "vqgan_steps", "t2i_steps", "upsampler_steps", "contrastive_steps"],
    ),
    "export": ("parti_jax.export:export_bundle", ["out_dir", "overwrite"]),
}

# Eval suites, named as in `eval.suites`: models, output folders and host shares are
# passed by the runner; the generating suites share `eval.sampling_config`, `eval.seed`
# and `eval.batch_size`.
_SUITES = {
    "parti_prompts": "parti_jax.eval.parti_prompts_suite:run_parti_prompts",
    "shapes": "parti_jax.eval.shapes_suite:run_shapes",
    "reconstruction": "parti_jax.eval.reconstruction:run_reconstruction",
    "fid": "parti_jax.eval.fid_suite:run_fid",
    "coco_fid": "parti_jax.eval.fid_suite:run_coco_fid",
}
_SUITE_INPUTS = {"generator", "out_dir", "tokenizer", "upsampler", "workdir", "process_index",
                 "process_count", "feature_fn", "lpips_fn"}  # fmt: skip
_SUITE_SHARED = {"sampling_config", "seed", "batch_size"}
_OPTIMIZER_CONFIG = "parti_jax.train.optimizers:OptimizerConfig"


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _lazy(name: str, target: str):
    def call(*args, **kwargs):
        return _load(target)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{target.replace(':', '.')} (imported when called)."
    return call


# ------------------------------------------------------------ checked values


class BindingError(ValueError):
    """A gin binding whose value does not fit the argument's annotation."""


def _checked(name: str, fn: Callable, annotated: Callable[[], Callable] | None = None) -> Callable:
    """`fn` for gin under `name`: before each call, every argument supplied by a gin
    binding is checked against the annotations of `annotated()` (default `fn`: a
    function or a dataclass), and a binding that names no argument is refused."""

    @functools.wraps(fn, updated=())
    def call(*args, **kwargs):
        _check_bound_arguments(name, annotated() if annotated else fn, kwargs)
        return fn(*args, **kwargs)

    call.__signature__ = inspect.signature(fn)  # what gin reads (a class: its fields)
    call.checked_against = annotated or (lambda: fn)
    return call


def _check_bound_arguments(name: str, fn: Callable, kwargs: dict[str, Any]) -> None:
    """Raises BindingError naming the binding (e.g. `train/LoopConfig.num_steps`) whose
    value in `kwargs` does not fit `fn`'s annotation, or that `fn` has no argument for."""
    keys = _binding_keys(name)
    if not keys:
        return
    params = inspect.signature(fn).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    hints = _type_hints(fn)
    for arg, key in keys.items():
        if arg not in params and not open_ended:
            raise BindingError(
                f"gin binding {key}: {name} has no argument {arg!r}; it takes {', '.join(params)}"
            )
        if arg in kwargs and not _fits(kwargs[arg], hints.get(arg, Any)):
            value = repr(kwargs[arg])
            value = value if len(value) <= 80 else value[:77] + "..."
            raise BindingError(
                f"gin binding {key}={value} must be {_describe(hints[arg])} "
                f"(got {type(kwargs[arg]).__name__}); fix it in the gin file or --gin flag"
            )


def _binding_keys(name: str) -> dict[str, str]:
    """{argument: the binding key that supplies it} for `name` in the current gin scope
    (the most specific scope wins, as in gin)."""
    scope = gin.current_scope()
    keys = {}
    with gin.config_scope(None):  # else gin reads an unscoped selector in the current scope
        for i in range(len(scope) + 1):
            selector = "/".join([*scope[:i], name])
            for arg in gin.get_bindings(selector, resolve_references=False, inherit_scopes=False):
                keys[arg] = f"{selector}.{arg}"
    return keys


def _type_hints(fn: Callable) -> dict[str, Any]:
    """{argument: annotation} of a function or dataclass ({} when one does not resolve:
    tests/cli/test_gin_values.py checks that each configurable's do)."""
    target = fn.__init__ if inspect.isclass(fn) and not dataclasses.is_dataclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except (NameError, TypeError):
        return {}


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable,
              collections.abc.Collection)  # fmt: skip


def _fits(value: Any, tp: Any) -> bool:
    """Whether `value` is of type `tp` as gin writes values: int is not bool, an int
    is a float, lists and tuples are interchangeable; unknown forms pass."""
    if tp is Any or isinstance(tp, (str, typing.TypeVar, typing.ForwardRef)):
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is typing.Annotated:
        return _fits(value, args[0])
    if tp in (int, float):
        kind = numbers.Integral if tp is int else numbers.Real
        return isinstance(value, kind) and not isinstance(value, bool)
    if origin is None:
        return isinstance(value, tp) if isinstance(tp, type) else True
    if origin is collections.abc.Callable:
        return callable(value)
    if origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_fits, value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        key, val = args or (Any, Any)
        return isinstance(value, collections.abc.Mapping) and all(
            _fits(k, key) and _fits(v, val) for k, v in value.items()
        )
    return isinstance(value, origin) if isinstance(origin, type) else True


def _describe(tp: Any) -> str:
    """`int | None`, `tuple[int, int]`, `LoopConfig`: a type as written, modules dropped."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return "None" if tp is type(None) else tp.__name__
    return re.sub(r"\b(?:[a-z_][a-z0-9_]*\.)+(?=[A-Za-z_])", "", repr(tp))


def adamw_optimizer(**overrides):
    """OptimizerConfig.adamw_defaults(**overrides): Adam β 0.9/0.99, warm-up + cosine."""
    from parti_jax.train.optimizers import OptimizerConfig

    return OptimizerConfig.adamw_defaults(**overrides)


def shapes_world_pixels(*, image_size: int, **kwargs):
    """ShapesPixelsIterator(image_size=..., batch_size=, shard_index=, num_shards=, seed=,
    split=): shapes-world images drawn at `image_size`, a TensorFlow-free `data_factory`
    for train_vqgan (`train_vqgan.data_factory = @shapes_world_pixels`)."""
    from parti_jax.train.synthetic import ShapesPixelsIterator

    return ShapesPixelsIterator(image_size=image_size, **kwargs)


def register_all() -> None:
    """Registers every configurable once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    from parti_jax.eval import suites

    for name, target in _CONFIGURABLES.items():
        _register(name, _load(target))
    for name, target in _LAZY.items():
        _register(name, _lazy(name, target), functools.partial(_load, target))
    # adamw_optimizer's keyword arguments are OptimizerConfig fields: checked as such.
    _register("adamw_optimizer", adamw_optimizer, functools.partial(_load, _OPTIMIZER_CONFIG))
    _register("shapes_world_pixels", shapes_world_pixels)
    for name, (target, passed) in _PASSED_BY_CLI.items():
        _register(name, _load(target), denylist=passed)
    for name, target in _SUITES.items():
        fn = _load(target)
        deny = _SUITE_INPUTS | _SUITE_SHARED if name in suites.GENERATING_SUITES else _SUITE_INPUTS
        _register(name, fn, denylist=sorted(set(inspect.signature(fn).parameters) & deny))
    _REGISTERED = True


def _register(name: str, fn: Callable, annotated: Callable[[], Callable] | None = None,
              denylist: list[str] | None = None) -> None:  # fmt: skip
    """gin.external_configurable(`_checked(name, fn, annotated)`, name=name)."""
    checked = _checked(name, fn, annotated)
    gin.external_configurable(checked, name=name, denylist=denylist)
