"""T5X's command-line spellings work on every subcommand: `--gin_bindings` (repeatable,
whole gin statements), comma-separated `--gin_search_paths`, `--model_dir` for
`--workdir`, and the `MODEL_DIR` gin macro bound to the work directory (before the gin
files are parsed, so a file may use `%MODEL_DIR`)."""

from __future__ import annotations

import re

import pytest

import gin
from parti_jax.cli import flags
from parti_jax.cli import main as cli


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()


def parse(*argv: str, workdir: bool = True) -> flags.CommonArgs:
    return flags.parse_args(flags.make_parser("test", "test", workdir=workdir), list(argv))


def test_gin_bindings_repeat_and_keep_command_line_order():
    args = parse(
        "--gin_bindings=train.batch_size = 8",
        "--gin.ModelConfig.d_model=64",
        "--gin_bindings",
        "train.batch_size=16",  # T5X's flags also take NAME=VALUE without spaces
        "--workdir=/w",
    )
    assert args.gin_bindings == ["train.batch_size = 8", "ModelConfig.d_model = 64",
                                 "train.batch_size=16"]  # fmt: skip
    flags.setup_gin(args, finalize=False)
    assert gin.query_parameter("train.batch_size") == 16  # the last one wins, as in T5X
    assert gin.query_parameter("ModelConfig.d_model") == 64


def test_bad_gin_bindings_name_the_flag_and_the_fix():
    with pytest.raises(flags.UsageError, match="--gin_bindings needs a gin statement"):
        parse("--gin_bindings")
    with pytest.raises(flags.UsageError, match="empty gin statement"):
        parse("--gin_bindings=  ")
    args = parse("--gin_bindings=train.task = shapes codes")
    with pytest.raises(flags.UsageError) as e:
        flags.setup_gin(args)
    message = str(e.value)
    assert message.startswith("--gin_bindings='train.task = shapes codes': ")
    assert "quote strings" in message and "--gin_bindings=" in message.split("e.g.")[1]
    # The --gin.NAME=VALUE spelling keeps its own message.
    with pytest.raises(flags.UsageError, match=r"^--gin\.train\.task=shapes codes: "):
        flags.setup_gin(parse("--gin.train.task=shapes codes"))


def test_comma_separated_gin_search_paths(tmp_path):
    first, second, third = (tmp_path / n for n in ("a", "b", "c"))
    for folder in (first, second, third):
        folder.mkdir()
    (second / "mine.gin").write_text("include 'models/tiny.gin'\nModelConfig.d_model = 48\n")
    (third / "other.gin").write_text("ModelConfig.num_heads = 2\n")
    args = parse(f"--gin_search_paths={first},{second}", f"--gin_search_path={third}",
                 "--gin_file=mine.gin", "--gin_file=other.gin")  # fmt: skip
    assert args.gin_search_paths == [str(first), str(second), str(third)]
    flags.setup_gin(args, finalize=False)
    config = gin.get_configurable("ModelConfig")()
    assert config.d_model == 48 and config.num_heads == 2


def unwrapped(config: str) -> str:
    """Gin's config text with its long-line wraps (`NAME = \\` + an indented value) undone."""
    return re.sub(r"\\\n\s+", "", config)


def test_model_dir_macro_reaches_gin_files(tmp_path):
    run_file = tmp_path / "uses_model_dir.gin"
    # T5X's run files declare the macro as required; the work dir still fills it.
    run_file.write_text("MODEL_DIR = %gin.REQUIRED\nWriterConfig.wandb_name = %MODEL_DIR\n")
    workdir = str(tmp_path / "run")
    flags.setup_gin(parse(f"--gin_file={run_file}", f"--workdir={workdir}"))
    assert gin.get_configurable("WriterConfig")().wandb_name == workdir
    assert f"MODEL_DIR = {workdir!r}" in unwrapped(gin.config_str())


def test_model_dir_is_harmless_to_files_that_do_not_use_it(tmp_path):
    flags.setup_gin(parse("--gin_file=models/tiny.gin", f"--workdir={tmp_path}"))
    assert gin.get_configurable("ModelConfig")().d_model > 0
    gin.clear_config()
    flags.setup_gin(parse("--gin_file=models/tiny.gin", workdir=False))  # no work dir at all
    assert gin.get_configurable("ModelConfig")().d_model > 0


def test_model_dir_flag_and_t5x_model_dir_binding(tmp_path):
    assert parse(f"--model_dir={tmp_path}").workdir == str(tmp_path)
    # T5X names the run's folder with --gin.MODEL_DIR (or a MODEL_DIR binding).
    assert parse('--gin.MODEL_DIR="/tmp/run"').workdir == "/tmp/run"
    assert parse("--gin_bindings=MODEL_DIR = '/tmp/run'").workdir == "/tmp/run"
    assert parse("--gin.MODEL_DIR='/x'", "--workdir=/x").workdir == "/x"
    with pytest.raises(flags.UsageError, match="name different work directories"):
        parse("--gin.MODEL_DIR='/x'", "--workdir=/y")
    with pytest.raises(flags.UsageError, match="MODEL_DIR must be a quoted folder name"):
        parse("--gin.MODEL_DIR=/x")
    # Subcommands without a work dir keep MODEL_DIR as an ordinary binding.
    assert parse("--gin.MODEL_DIR='/x'", workdir=False).gin_bindings == ["MODEL_DIR = '/x'"]


@pytest.mark.parametrize(
    "command",
    ["train", "train-vqgan", "train-upsampler", "train-contrastive", "sample", "eval",
     "export", "demo", "benchmark", "precompute-codes", "train-vocab", "launch"],
)  # fmt: skip
def test_every_subcommand_lists_the_t5x_flags(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--gin_bindings", "--gin_search_paths", "--gin_search_path", "--gin_file"):
        assert flag in text, (command, flag)
    has_workdir = command not in ("benchmark", "precompute-codes", "train-vocab", "launch")
    assert ("--model_dir" in text) == has_workdir, command


def test_train_vqgan_runs_with_a_t5x_command_line(tmp_path, capsys):
    """A T5X user's flags, unchanged, on a real (tiny) run: --gin_search_paths, a gin file
    using %MODEL_DIR, --gin_bindings and --model_dir."""
    mine = tmp_path / "gin"
    mine.mkdir()
    (mine / "my_run.gin").write_text(
        "include 'runs/tiny_vqgan.gin'\n"
        "train_vqgan/LoopConfig.writers = @WriterConfig()\n"
        "WriterConfig.wandb_name = %MODEL_DIR\n"
    )
    model_dir = tmp_path / "run"
    argv = [
        "train-vqgan",
        f"--gin_search_paths={tmp_path / 'nowhere'},{mine}",
        "--gin_file=my_run.gin",
        "--gin_bindings=train_vqgan/LoopConfig.num_steps = 2",
        "--gin_bindings=train_vqgan/LoopConfig.eval_every = None",
        "--gin_bindings=train_vqgan/LoopConfig.log_every = 1",
        "--gin_bindings=train_vqgan.codebook_window = 2",
        "--gin_bindings=train_vqgan/LoopConfig.async_checkpoints = False",
        f"--model_dir={model_dir}",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (model_dir / "checkpoints" / "2").is_dir()
    operative = unwrapped((model_dir / "operative_config.gin").read_text())
    assert f"MODEL_DIR = {str(model_dir)!r}" in operative
    assert "WriterConfig.wandb_name = %MODEL_DIR" in operative
    assert "num_steps = 2" in (model_dir / "config.gin").read_text()
