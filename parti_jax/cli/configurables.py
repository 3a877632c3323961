"""Registers library functions and config dataclasses with gin.

This is the only place (with the subcommand modules) where gin meets library
code: library modules never import gin. Names registered here are what gin
files bind, e.g. `ModelConfig.d_model = 1024` or `train/LoopConfig.num_steps = 1000`.

Each area owns one `_register_<area>` function below. Imports happen inside
them, and none may import TensorFlow at module level.
"""

from __future__ import annotations

import gin

_REGISTERED = False


def _external(obj, name: str, module: str | None = None) -> None:
    gin.external_configurable(obj, name=name, module=module)


def _register_models() -> None:
    """Encoder-decoder config and sizes (parti_jax.models)."""
    from parti_jax.models.config import ModelConfig

    # Sizes: gin/models/*.gin bind ModelConfig.<field>; runs use @ModelConfig().
    _external(ModelConfig, "ModelConfig")


def _register_partitioning() -> None:
    """Mesh and logical-axis rules (parti_jax.partitioning)."""
    from parti_jax.partitioning import MeshConfig

    # MeshConfig.rules selects the rule table by name: 'data_parallel', 'fsdp', 'fsdp_tp'.
    _external(MeshConfig, "MeshConfig")


def _register_train() -> None:
    """Trainer, its loop and optimizer (parti_jax.train).

    Each trainer takes `loop = @<trainer>/LoopConfig()`: bindings scoped by the
    trainer's name (`train/LoopConfig.num_steps = 1000`) apply to it alone,
    unscoped `LoopConfig.<field>` bindings to all.
    """
    from parti_jax.train import t2i
    from parti_jax.train.loop import LoopConfig
    from parti_jax.train.optimizers import OptimizerConfig

    _external(t2i.train, "train")
    _external(LoopConfig, "LoopConfig")
    _external(OptimizerConfig, "OptimizerConfig")


def _register_data() -> None:
    """Input pipeline configuration (parti_jax.data).

    The task factories import TensorFlow, so gin sees thin wrappers that import
    `parti_jax.tasks` only when called: a gin file can say
    `train.task = @register_codes_task()` with `register_codes_task.name = ...`
    and `register_codes_task.codes_dir = ...`, and subcommands that never build
    a task stay TensorFlow-free. Each wrapper takes the arguments of the
    function of the same name in `parti_jax.tasks` and returns the seqio task.
    """

    def _tasks():
        import parti_jax.tasks  # noqa: PLC0415 - TensorFlow only when a task is built

        return parti_jax.tasks

    def register_shapes_task(*args, **kwargs):
        """parti_jax.tasks.register_shapes_task: `<name>_pixels` over the shapes world."""
        return _tasks().register_shapes_task(*args, **kwargs)

    def register_coco_task(*args, **kwargs):
        """parti_jax.tasks.register_coco_task: `<name>_pixels` over TFDS coco_captions."""
        return _tasks().register_coco_task(*args, **kwargs)

    def register_folder_task(*args, **kwargs):
        """parti_jax.tasks.register_folder_task: `<name>_pixels` over images + captions."""
        return _tasks().register_folder_task(*args, **kwargs)

    def register_codes_task(*args, **kwargs):
        """parti_jax.tasks.register_codes_task: `<name>_codes` over precomputed codes."""
        return _tasks().register_codes_task(*args, **kwargs)

    def register_mixture(*args, **kwargs):
        """parti_jax.tasks.register_mixture: a mixture of registered tasks with rates."""
        return _tasks().register_mixture(*args, **kwargs)

    for fn in (
        register_shapes_task,
        register_coco_task,
        register_folder_task,
        register_codes_task,
        register_mixture,
    ):
        _external(fn, fn.__name__)


def _register_vqgan() -> None:
    """ViT-VQGAN model, losses and training (parti_jax.vqgan)."""
    from parti_jax.vqgan.config import VQGANConfig
    from parti_jax.vqgan.discriminator import DiscriminatorConfig
    from parti_jax.vqgan.losses import LossConfig

    _external(VQGANConfig, "VQGANConfig")
    _external(LossConfig, "LossConfig")
    _external(DiscriminatorConfig, "DiscriminatorConfig")


def _register_vqgan_training() -> None:
    """train-vqgan and precompute-codes (parti_jax.vqgan.train, parti_jax.vqgan.precompute).

    `adamw_optimizer(**overrides)` is OptimizerConfig.adamw_defaults (Adam
    β 0.9/0.99, warm-up + cosine); scope it per group, e.g.
    `train_vqgan.generator_optimizer = @generator/adamw_optimizer()`.
    precompute_codes imports TensorFlow, so gin sees a wrapper that imports it
    only when called.
    """
    from parti_jax.train.optimizers import OptimizerConfig
    from parti_jax.vqgan.train import train_vqgan

    def adamw_optimizer(**overrides):
        """OptimizerConfig.adamw_defaults(**overrides)."""
        return OptimizerConfig.adamw_defaults(**overrides)

    def precompute_codes(**kwargs):
        """parti_jax.vqgan.precompute.precompute_codes (see its arguments)."""
        from parti_jax.vqgan import precompute  # noqa: PLC0415 - TensorFlow only when called

        return precompute.precompute_codes(**kwargs)

    _external(train_vqgan, "train_vqgan")
    _external(adamw_optimizer, "adamw_optimizer")
    _external(precompute_codes, "precompute_codes")


def _register_upsampler() -> None:
    """Upsampler model and training (parti_jax.upsampler)."""
    from parti_jax.upsampler.config import UpsamplerConfig

    _external(UpsamplerConfig, "UpsamplerConfig")


def _register_sampling() -> None:
    """Decoding and sampling (parti_jax.decoding)."""
    from parti_jax.decoding import SamplingConfig

    _external(SamplingConfig, "SamplingConfig")


def _register_sample_upsampler() -> None:
    """`parti-jax sample` (`sample.*`) and `parti-jax train-upsampler` (`train_upsampler.*`).

    The CLI passes `workdir` and the prompts; gin binds the model paths, the
    sampling settings and the trainer's configs. Scoped optimizers:
    `train_upsampler.generator_optimizer = @generator/OptimizerConfig()`.
    """
    from parti_jax import sampling
    from parti_jax.upsampler import train as upsampler_train

    _external(sampling.sample_to_folder, "sample")
    _external(upsampler_train.train_upsampler, "train_upsampler")


def _register_eval_suites() -> None:
    """`parti-jax eval` (`eval.*`) and one configurable per suite, named as in `eval.suites`.

    Models, output folders and host shares are passed by the CLI; the sampling
    settings shared by the generating suites are `eval.sampling_config`,
    `eval.seed` and `eval.batch_size`.
    """
    import inspect

    from parti_jax.eval import (
        fid_suite,
        parti_prompts_suite,
        reconstruction,
        runner,
        shapes_suite,
        suites,
    )

    passed_in = {"generator", "out_dir", "tokenizer", "upsampler", "workdir", "process_index",
                 "process_count", "feature_fn", "lpips_fn"}  # fmt: skip
    shared = {"sampling_config", "seed", "batch_size"}  # eval.* for the generating suites
    for fn, name in (
        (parti_prompts_suite.run_parti_prompts, "parti_prompts"),
        (shapes_suite.run_shapes, "shapes"),
        (reconstruction.run_reconstruction, "reconstruction"),
        (fid_suite.run_fid, "fid"),
        (fid_suite.run_coco_fid, "coco_fid"),
    ):
        deny = passed_in | shared if name in suites.GENERATING_SUITES else passed_in
        params = set(inspect.signature(fn).parameters)
        gin.external_configurable(fn, name=name, denylist=sorted(params & deny))
    gin.external_configurable(
        runner.run_eval_suites,
        name="eval",
        denylist=["workdir", "suite_fns", "process_index", "process_count", "inputs"],
    )


def _register_demo() -> None:
    """`parti-jax demo` (`demo.*`, parti_jax.demo.run_demo) and the shapes-world pixel source.

    The CLI passes the work directory, the stage functions and the step counts
    for the progress bars; gin binds the rest (`demo.sample_prompts`,
    `demo.stages`, `demo.train_vocab`, ...). `shapes_world_pixels` is a
    TensorFlow-free `data_factory` for train_vqgan:
    `train_vqgan.data_factory = @shapes_world_pixels` with
    `shapes_world_pixels.image_size = 32`. `ShapesWorldConfig` is the world
    (parti_jax.data.shapes), e.g. for `register_shapes_task.config`, so that a
    task draws scenes at the VQGAN's resolution instead of resizing them.
    """
    from parti_jax import demo
    from parti_jax.data.shapes import ShapesWorldConfig
    from parti_jax.train.synthetic import ShapesPixelsIterator

    def shapes_world_pixels(*, image_size: int, **kwargs):
        """ShapesPixelsIterator(image_size=..., batch_size=, shard_index=, num_shards=, seed=,
        split=): shapes-world images drawn at `image_size`."""
        return ShapesPixelsIterator(image_size=image_size, **kwargs)

    gin.external_configurable(
        demo.run_demo,
        name="demo",
        denylist=["workdir", "fns", "vqgan_steps", "t2i_steps", "upsampler_steps"],
    )
    _external(shapes_world_pixels, "shapes_world_pixels")
    _external(ShapesWorldConfig, "ShapesWorldConfig")


def _register_launch_export() -> None:
    """Launch targets and export (parti_jax.launch, parti_jax.export)."""
    from parti_jax.launch import LaunchSpec
    from parti_jax.launch.gke import GkeTarget
    from parti_jax.launch.local import LocalTarget
    from parti_jax.launch.slurm import SlurmTarget
    from parti_jax.launch.tpu import TpuTarget
    from parti_jax.memory import HardwareTarget

    # HardwareTarget: the machine a run file is written for (`parti-jax benchmark memory`).
    for cls in (LaunchSpec, TpuTarget, GkeTarget, SlurmTarget, LocalTarget, HardwareTarget):
        _external(cls, cls.__name__)


def _register_export() -> None:
    """`parti-jax export` (`export.*`): model paths, SamplingConfig, jax.export options.

    The CLI passes the bundle directory (--workdir) and --overwrite.
    """
    from parti_jax import export

    gin.external_configurable(export.export_bundle, name="export",
                              denylist=["out_dir", "overwrite"])  # fmt: skip


def register_all() -> None:
    """Registers every configurable once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    for fn in (
        _register_models,
        _register_partitioning,
        _register_train,
        _register_data,
        _register_vqgan,
        _register_vqgan_training,
        _register_upsampler,
        _register_sampling,
        _register_sample_upsampler,
        _register_eval_suites,
        _register_demo,
        _register_launch_export,
        _register_export,
    ):
        fn()
    _REGISTERED = True
