"""Registers library functions and config dataclasses with gin.

This is the only place (with the subcommand modules) where gin meets library
code: library modules never import gin. Names registered here are what gin
files bind, e.g. `ModelConfig.d_model = 1024` or `train/LoopConfig.num_steps = 1000`.
Nothing registered here may import TensorFlow at module level.
"""

from __future__ import annotations

import importlib
import inspect

import gin

_REGISTERED = False

# gin name -> 'module:attribute'. Each trainer takes `loop = @<trainer>/LoopConfig()`:
# bindings scoped by the trainer's name (`train/LoopConfig.num_steps = 1000`) apply to
# it alone, unscoped `LoopConfig.<field>` bindings to all. Trainers with two optimizers
# take scoped ones: `train_vqgan.generator_optimizer = @generator/adamw_optimizer()`.
# MeshConfig.rules selects the rule table by name ('data_parallel', 'fsdp', 'fsdp_tp');
# HardwareTarget is the machine a run file is written for (`parti-jax benchmark memory`);
# ShapesWorldConfig the shapes world (e.g. `register_shapes_task.config`, so that a task
# draws scenes at the VQGAN's resolution instead of resizing them).
_CONFIGURABLES = {
    "ModelConfig": "parti_jax.models.config:ModelConfig",
    "MeshConfig": "parti_jax.partitioning:MeshConfig",
    "train": "parti_jax.train.t2i:train",
    "LoopConfig": "parti_jax.train.loop:LoopConfig",
    "OptimizerConfig": "parti_jax.train.optimizers:OptimizerConfig",
    "VQGANConfig": "parti_jax.vqgan.config:VQGANConfig",
    "LossConfig": "parti_jax.vqgan.losses:LossConfig",
    "DiscriminatorConfig": "parti_jax.vqgan.discriminator:DiscriminatorConfig",
    "train_vqgan": "parti_jax.vqgan.train:train_vqgan",
    "UpsamplerConfig": "parti_jax.upsampler.config:UpsamplerConfig",
    "train_upsampler": "parti_jax.upsampler.train:train_upsampler",
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
        ["workdir", "fns", "vqgan_steps", "t2i_steps", "upsampler_steps"],
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


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _lazy(name: str, target: str):
    def call(*args, **kwargs):
        return _load(target)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{target.replace(':', '.')} (imported when called)."
    return call


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
        gin.external_configurable(_load(target), name=name)
    for name, target in _LAZY.items():
        gin.external_configurable(_lazy(name, target), name=name)
    for fn in (adamw_optimizer, shapes_world_pixels):
        gin.external_configurable(fn, name=fn.__name__)
    for name, (target, passed) in _PASSED_BY_CLI.items():
        gin.external_configurable(_load(target), name=name, denylist=passed)
    for name, target in _SUITES.items():
        fn = _load(target)
        deny = _SUITE_INPUTS | _SUITE_SHARED if name in suites.GENERATING_SUITES else _SUITE_INPUTS
        params = set(inspect.signature(fn).parameters)
        gin.external_configurable(fn, name=name, denylist=sorted(params & deny))
    _REGISTERED = True
