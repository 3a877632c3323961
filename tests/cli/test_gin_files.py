"""Every shipped gin file parses on its own, with unknown names as errors.

Files are found with `flags.list_gin_files()`, so files added later are
covered too. Each is parsed alone through `flags.setup_gin` (which uses
`skip_unknown=False`), and the config dataclasses it may bind are built, so
bad values fail here rather than at the start of a run.
"""

from __future__ import annotations

import argparse

import pytest

import gin
from parti_jax.cli import flags

GIN_FILES = flags.list_gin_files()
# Dataclasses whose bindings are checked by building them after parsing.
BUILT = ("ModelConfig", "MeshConfig")


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()


def parse(*files: str, search: tuple[str, ...] = ()) -> None:
    args = flags.CommonArgs(list(files), [], list(search), None, argparse.Namespace())
    flags.setup_gin(args, finalize=False)


def test_gin_files_are_shipped():
    assert "models/base.gin" in GIN_FILES and "models/tiny.gin" in GIN_FILES


@pytest.mark.parametrize("name", GIN_FILES)
def test_gin_file_parses(name):
    parse(name)
    for configurable in BUILT:
        gin.get_configurable(configurable)()  # validates every bound field


def test_missing_include_fails(tmp_path):
    bad = tmp_path / "bad_include.gin"
    bad.write_text("include 'models/no_such_size.gin'\n")
    with pytest.raises(flags.UsageError, match="bad_include.gin"):
        parse(str(bad))


def test_unknown_parameter_fails(tmp_path):
    bad = tmp_path / "bad_param.gin"
    bad.write_text("include 'models/tiny.gin'\nModelConfig.d_modell = 64\n")
    with pytest.raises(flags.UsageError, match="d_modell"):
        parse(str(bad))


def test_unknown_configurable_fails(tmp_path):
    bad = tmp_path / "bad_configurable.gin"
    bad.write_text("NoSuchConfig.size = 1\n")
    with pytest.raises(flags.UsageError, match="NoSuchConfig"):
        parse(str(bad))


def test_bad_value_fails_when_built(tmp_path):
    bad = tmp_path / "bad_value.gin"
    bad.write_text("include 'models/tiny.gin'\nModelConfig.mlp_activation = 'gelux'\n")
    parse(str(bad))
    with pytest.raises(ValueError, match="mlp_activation='gelux'"):
        gin.get_configurable("ModelConfig")()


def test_mesh_rules_selected_by_name(tmp_path):
    good = tmp_path / "mesh.gin"
    good.write_text("MeshConfig.rules = 'fsdp_tp'\nMeshConfig.tensor = 2\n")
    parse(str(good))
    mesh_config = gin.get_configurable("MeshConfig")()
    assert mesh_config.rules == "fsdp_tp" and mesh_config.tensor == 2
    gin.clear_config()
    good.write_text("MeshConfig.rules = 'tensor_only'\n")
    parse(str(good))
    with pytest.raises(ValueError, match="unknown partitioning rules 'tensor_only'"):
        gin.get_configurable("MeshConfig")()


def test_gin_flags_are_split_from_the_others(tmp_path):
    parser = flags.make_parser("x", "test")
    argv = ["--gin.train.batch_size", "8", "--gin.ModelConfig.d_model=64", "--workdir=/w"]
    args = flags.parse_args(parser, argv)
    assert args.gin_bindings == ["train.batch_size = 8", "ModelConfig.d_model = 64"]
    assert args.workdir == "/w" and args.gin_files == []
    with pytest.raises(flags.UsageError, match="needs a value"):
        flags.parse_args(parser, ["--gin.train.batch_size"])
    with pytest.raises(flags.UsageError, match="empty binding name"):
        flags.parse_args(parser, ["--gin.=3"])
    with pytest.raises(flags.UsageError, match="gin file models/no_such.gin: Unable to open"):
        parse("models/no_such.gin")
    # A file in a --gin_search_path folder is found by its relative name.
    (tmp_path / "mine.gin").write_text("include 'models/tiny.gin'\nModelConfig.d_model = 48\n")
    parse("mine.gin", search=(str(tmp_path),))
    assert gin.get_configurable("ModelConfig")().d_model == 48
