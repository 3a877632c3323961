"""Every gin value of the entry points is type-checked before anything is built.

Each row binds one wrong-typed value with the command line's own `--gin.` flags
(parsed by `flags`) and calls the entry point as its subcommand does: the call
fails with one `BindingError` line naming the binding as bound (scoped names
included) while `jax.jit` and `jax.eval_shape` are disabled, so no model was
being built. The shipped gin files' values all fit their annotations, and the
subcommands print the error as one line with exit 2.
"""

from __future__ import annotations

import importlib
import typing

import jax
import pytest

import gin
from parti_jax.cli import configurables, flags
from parti_jax.cli import main as cli

TRAIN, VQGAN, UPSAMPLER = "runs/tiny_train.gin", "runs/tiny_vqgan.gin", "runs/tiny_upsampler.gin"
PATHS = {"t2i_path": "/nonexistent/t2i", "vqgan_path": "/nonexistent/vqgan"}
# What each subcommand passes itself (cli/*.py); `tmp` is replaced by a fresh folder.
CALLS = {
    "train": ((), {"workdir": "tmp"}),
    "train_vqgan": ((), {"workdir": "tmp"}),
    "train_upsampler": ((), {"workdir": "tmp"}),
    "sample": ((), {"workdir": "tmp", "prompts": ["a red circle"], "progress": False, **PATHS}),
    "eval": ((), {"workdir": "tmp", "suite_fns": {}, "process_index": None, "process_count": None}),
    "export": (("tmp",), {"overwrite": False, **PATHS}),
    "precompute_codes": ((), {"vqgan": "/nonexistent", "output_dir": "tmp", "split": "train"}),
}
# (gin file or None, bindings, entry point, the error's start after "gin binding ").
CASES = [
    (TRAIN, ["train.batch_size='8'"], "train", "train.batch_size='8' must be int (got str)"),
    (TRAIN, ["train.loop=@ModelConfig()"], "train", "train.loop=ModelConfig(text_vocab_size="),
    (TRAIN, ["train.restore_from=3"], "train", "train.restore_from=3 must be str | None (got int)"),
    (TRAIN, ["train/LoopConfig.num_steps='ten'"], "train",
     "train/LoopConfig.num_steps='ten' must be int (got str)"),
    (TRAIN, ["LoopConfig.profile_steps=[1, 2, 3]"], "train",
     "LoopConfig.profile_steps=[1, 2, 3] must be tuple[int, int] | None (got list)"),
    (TRAIN, ["ModelConfig.d_model=64.5"], "train", "ModelConfig.d_model=64.5 must be int (got float)"),
    (TRAIN, ["ModelConfig.scan_layers=1"], "train", "ModelConfig.scan_layers=1 must be bool (got int)"),
    (TRAIN, ["OptimizerConfig.learning_rate='1e-2'"], "train",
     "OptimizerConfig.learning_rate='1e-2' must be float (got str)"),
    (TRAIN, ["MeshConfig.data='2'"], "train", "MeshConfig.data='2' must be int (got str)"),
    (VQGAN, ["train_vqgan.num_grid_images=True"], "train_vqgan",
     "train_vqgan.num_grid_images=True must be int (got bool)"),
    (VQGAN, ["VQGANConfig.codebook_size=64.0"], "train_vqgan",
     "VQGANConfig.codebook_size=64.0 must be int (got float)"),
    (VQGAN, ["train_vqgan/LoopConfig.eval_every='10'"], "train_vqgan",
     "train_vqgan/LoopConfig.eval_every='10' must be int | None (got str)"),
    (VQGAN, ["generator/adamw_optimizer.learning_rate='fast'"], "train_vqgan",
     "generator/adamw_optimizer.learning_rate='fast' must be float (got str)"),
    (VQGAN, ["generator/adamw_optimizer.learning_rat=1.0"], "train_vqgan",
     "generator/adamw_optimizer.learning_rat: adamw_optimizer has no argument 'learning_rat'"),
    (UPSAMPLER, ["train_upsampler.clean_fraction='half'"], "train_upsampler",
     "train_upsampler.clean_fraction='half' must be float (got str)"),
    (UPSAMPLER, ["UpsamplerConfig.channels=(8,)"], "train_upsampler",
     "UpsamplerConfig.channels=(8,) must be int (got tuple)"),
    (None, ["sample.keep_top_k='2'"], "sample", "sample.keep_top_k='2' must be int (got str)"),
    (None, ["sample.sampling_config=@SamplingConfig()", "SamplingConfig.top_k=2.5"], "sample",
     "SamplingConfig.top_k=2.5 must be int | None (got float)"),
    (None, ["sample.config_overrides=['dtype']"], "sample",
     "sample.config_overrides=['dtype'] must be Mapping[str, Any] | None (got list)"),
    ("runs/eval_shapes.gin", ["eval.batch_size=[8]"], "eval",
     "eval.batch_size=[8] must be int | None (got list)"),
    ("runs/eval_shapes.gin", ["eval.suites='shapes'"], "eval",
     "eval.suites='shapes' must be Sequence[str] (got str)"),
    ("runs/eval_shapes.gin", ["eval.sampling_config=@ModelConfig()"], "eval",
     "eval.sampling_config=ModelConfig("),
    (None, ["export.t2i_step='latest'"], "export",
     "export.t2i_step='latest' must be int | None (got str)"),
    (None, ["export.platforms='cpu'"], "export",
     "export.platforms='cpu' must be Sequence[str] | None (got str)"),
    (None, ["precompute_codes.task=None", "precompute_codes.shard_size='big'"], "precompute_codes",
     "precompute_codes.shard_size='big' must be int (got str)"),
    (TRAIN, ["train.task=@register_shapes_task()", "register_shapes_task.nme='x'"], "train",
     "register_shapes_task.nme: register_shapes_task has no argument 'nme'"),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()


def parse(gin_file: str | None, bindings: list[str]) -> None:
    """The subcommands' parsing: --gin_file / --gin.NAME=VALUE through `flags`."""
    argv = [f"--gin_file={gin_file}"] if gin_file else []
    argv += [f"--gin.{b}" for b in bindings]
    flags.setup_gin(flags.parse_args(flags.make_parser("test", "test"), argv))


def _nothing_built(*args, **kwargs):
    raise AssertionError("a model was being built before the gin values were checked")


@pytest.mark.parametrize(("gin_file", "bindings", "entry", "message"), CASES)
def test_wrong_typed_binding_fails_naming_it(gin_file, bindings, entry, message, tmp_path,
                                             monkeypatch):  # fmt: skip
    parse(gin_file, bindings)
    for target in configurables._LAZY.values():  # imported (TensorFlow) before jit goes
        importlib.import_module(target.partition(":")[0])
    args, kwargs = CALLS[entry]
    args = [str(tmp_path) if a == "tmp" else a for a in args]
    kwargs = {k: str(tmp_path) if v == "tmp" else v for k, v in kwargs.items()}
    monkeypatch.setattr(jax, "jit", _nothing_built)
    monkeypatch.setattr(jax, "eval_shape", _nothing_built)
    with pytest.raises(configurables.BindingError) as e:
        gin.get_configurable(entry)(*args, **kwargs)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"gin binding {message}"), first


@pytest.mark.parametrize("name", flags.list_gin_files())
def test_shipped_gin_values_fit_their_annotations(name):
    """What the checks would refuse at a call: no shipped gin file binds it."""
    parse(name, [])
    for (_, selector), bound in gin.config._CONFIG.items():
        annotated = getattr(gin.config._REGISTRY[selector].wrapped, "checked_against", None)
        if annotated is None:  # gin's macros and constants
            continue
        hints = typing.get_type_hints(annotated())
        for arg, value in bound.items():
            if not any(True for _ in gin.config.iterate_references(value)):
                assert configurables._fits(value, hints.get(arg, typing.Any)), (selector, arg)


def test_every_configurable_is_annotated():
    """Each registered function and config class has resolvable annotations (else its
    values would go unchecked)."""
    configurables.register_all()
    for name in [*configurables._CONFIGURABLES, *configurables._LAZY,
                 *configurables._PASSED_BY_CLI, *configurables._SUITES]:  # fmt: skip
        annotated = gin.config._REGISTRY.get_match(name).wrapped.checked_against()
        assert configurables._type_hints(annotated), name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", f"--gin_file={TRAIN}", "--gin.train/LoopConfig.num_steps='ten'"],
         "train/LoopConfig.num_steps='ten' must be int (got str)"),
        (["precompute-codes", "--vqgan=/nonexistent", "--gin.precompute_codes.task=None",
          "--gin.precompute_codes.batch_size=8.0"],
         "precompute_codes.batch_size=8.0 must be int (got float)"),
    ],
)  # fmt: skip
def test_the_command_line_prints_one_line(argv, message, tmp_path, capsys):
    where = "--output_dir" if argv[0] == "precompute-codes" else "--workdir"
    assert cli.main([*argv, f"{where}={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"parti-jax: error: gin binding {message}; fix it in the gin file or --gin flag"]


@pytest.mark.parametrize(
    ("binding", "message"),
    [
        ("train.batch_size=-8", "train.batch_size=-8 must be an integer >= 1"),
        ("train/LoopConfig.num_steps=0", "LoopConfig.num_steps=0 must be an integer >= 1"),
        ("train/LoopConfig.keep_checkpoints=1", "LoopConfig.keep_checkpoints=1 must be"),
    ],
)
def test_out_of_range_values_are_one_line_before_anything_trains(
    binding, message, tmp_path, capsys
):
    """The issue's reproductions: once 'not enough values to unpack' or an exit 0 leaving an
    empty checkpoints/; now one line naming the value, exit 2, no checkpoint folder."""
    out = tmp_path / "out"
    assert cli.main(["train", f"--gin_file={TRAIN}", f"--gin.{binding}", f"--workdir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "checkpoints").exists()
