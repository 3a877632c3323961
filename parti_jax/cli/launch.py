"""`parti-jax launch`: Run a command on TPU VM pods, GKE, SLURM or local processes.

    parti-jax launch {tpu,gke,slurm,local} [flags] [--dry_run] -- <command ...>
    parti-jax launch slurm --num_hosts=2 --devices_per_host=8 --command="parti-jax train ..."

Every host runs the same command; the launcher sets the environment that
`jax.distributed.initialize()` needs (see docs/LAUNCH.md). `--dry_run` prints
the exact script, manifest or commands instead of running them and needs no
gcloud / kubectl / sbatch. Settings may also come from gin files
(`--gin_file=launch/tpu_v5e_16_spot.gin`) binding `LaunchSpec.*`,
`TpuTarget.*`, `GkeTarget.*`, `SlurmTarget.*` or `LocalTarget.*`; flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import gin
from parti_jax import partitioning
from parti_jax.cli import flags
from parti_jax.launch import common, gke, local, slurm, tpu
from parti_jax.launch.common import LaunchSpec

DESCRIPTION = "Run a command on TPU VM pods, GKE, SLURM or local processes."
_TARGET_CLASSES = {
    "tpu": tpu.TpuTarget,
    "gke": gke.GkeTarget,
    "slurm": slurm.SlurmTarget,
    "local": local.LocalTarget,
}
TARGETS = tuple(_TARGET_CLASSES)
_SPEC_FIELDS = {f.name for f in dataclasses.fields(LaunchSpec)}
_INT = {"type": int}
_BOOL = {"action": argparse.BooleanOptionalAction}
# (targets it applies to, flag, add_argument options). A flag sets the field of its name
# of LaunchSpec or of the target's dataclass (--sbatch_arg: SlurmTarget.sbatch_args).
_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("tpu gke slurm local", "name", {"help": "job / TPU / JobSet name (lowercase, digits, '-')"}),
    ("tpu gke slurm", "num_hosts", {**_INT, "help": "hosts per slice (gke GPU, slurm)"}),
    ("tpu gke", "num_slices", {**_INT, "help": "TPU slices over DCN (multi-slice)"}),
    ("tpu gke slurm", "devices_per_host", {**_INT, "help": "GPUs per node (gke GPU, slurm)"}),
    ("tpu gke local", "max_restarts", {**_INT, "help": "restarts after a lost run"}),
    ("tpu slurm local", "log_dir", {"help": "local folder for logs"}),
    ("tpu gke", "spot", {**_BOOL, "help": "spot capacity (tpu, gke)"}),
    ("tpu slurm", "script", {"help": "where to write the generated script"}),
    ("tpu", "zone", {}),
    ("tpu", "project", {}),
    ("tpu", "accelerator_type", {"help": f"e.g. {tpu.EXAMPLES}"}),
    ("tpu", "runtime_version", {}),
    ("tpu", "queued", {**_BOOL, "help": "use queued resources"}),
    (
        "tpu",
        "install",
        {**_BOOL, "help": "ship and install the wheel (--no-install: image has it)"},
    ),
    ("tpu", "install_command", {"help": "run on every worker instead of shipping the wheel"}),
    ("tpu slurm", "wheel", {"help": "wheel to install (default: dist/parti_jax-<version>-...whl)"}),
    ("tpu slurm", "constraints", {"help": "pins to install with (default: next to the wheel)"}),
    ("tpu slurm", "python", {"help": "a Python 3.11 on the hosts (default: uv fetches one)"}),
    ("tpu slurm", "jax", {"help": "jax requirement (default: jax[tpu|cuda12]==the pin)"}),
    ("tpu slurm", "extras", {"help": "parti_jax extras to install, e.g. data"}),
    ("tpu", "remote_log", {"help": "log file on every worker"}),
    ("tpu", "poll_seconds", _INT),
    ("tpu", "delete_at_end", {**_BOOL, "help": "delete the slice when the run ends"}),
    ("gke", "image", {"help": "container image with parti_jax (default: from --registry)"}),
    ("gke", "registry", {"help": "registry of REGISTRY/parti-jax:<version>-<tpu|cuda>"}),
    ("gke", "accelerator", {"help": "TPU type (v5litepod-16) or GPU (nvidia-h100-80gb)"}),
    ("gke", "topology", {"help": "TPU node pool topology, e.g. 4x4"}),
    ("gke", "namespace", {}),
    ("gke", "coordinator_port", _INT),
    ("gke", "termination_grace_seconds", _INT),
    ("gke", "host_network", _BOOL),
    ("gke", "service_account", {}),
    ("gke", "manifest", {"help": "where to write the JobSet YAML"}),
    ("slurm", "partition", {}),
    ("slurm", "account", {}),
    ("slurm", "time", {"help": "time limit, e.g. 24:00:00"}),
    ("slurm", "gpus", {**_BOOL, "help": "--no-gpus for CPU-only nodes"}),
    ("slurm", "one_process_per_device", {**_BOOL, "help": "one task per GPU"}),
    ("slurm", "cpus_per_task", _INT),
    ("slurm", "port", {**_INT, "help": "coordinator port (default: from job id)"}),
    ("slurm", "signal_seconds", _INT),
    ("slurm", "requeue", _BOOL),
    ("slurm", "setup", {"help": "shell lines before srun"}),
    ("slurm", "sbatch_arg", {"action": "append", "help": "extra #SBATCH option"}),
    ("slurm", "venv", {"help": "install the wheel into this venv on the shared filesystem"}),
    ("local", "num_processes", _INT),
    ("local", "devices_per_process", _INT),
    ("local", "term_timeout_s", {"type": float}),
)


def _group_title(targets: str, flag: str) -> str:
    if flag in _SPEC_FIELDS:
        return "job (LaunchSpec)"
    if " " in targets:
        return "shared by several targets"
    return f"{targets} ({_TARGET_CLASSES[targets].__name__})"


def make_parser() -> argparse.ArgumentParser:
    parser = flags.make_parser("launch", DESCRIPTION, workdir=False)
    parser.usage = "parti-jax launch {tpu,gke,slurm,local} [flags] [--dry_run] -- COMMAND ..."
    parser.add_argument("target", choices=TARGETS, help="where to run")
    parser.add_argument(
        "--command", default=None, help="the command (shell words), instead of `-- COMMAND`"
    )
    parser.add_argument("--dry_run", action="store_true", help="print what would run; run nothing")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for targets, flag, options in _FLAGS:
        title = _group_title(targets, flag)
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        groups[title].add_argument(f"--{flag}", default=None, **options)
    job = groups["job (LaunchSpec)"]
    job.add_argument(
        "--mesh", default=None, help="mesh degrees, e.g. data=2,fsdp=4,tensor=1,dcn_data=2"
    )
    job.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for every process; repeatable"
    )
    return parser


def _configured(cls: type, kwargs: dict[str, Any]) -> Any:
    """`cls(**kwargs)` with gin bindings applied underneath, as a plain dataclass."""
    try:
        obj = gin.get_configurable(cls.__name__)(**kwargs)
    except (TypeError, ValueError) as e:
        raise flags.UsageError(f"{cls.__name__}: {flags.one_line(e)}") from e
    return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})


def build(
    target_name: str, ns: argparse.Namespace, command: Sequence[str]
) -> tuple[LaunchSpec, Any]:
    """The LaunchSpec and the target object from flags (over gin bindings)."""
    spec_kwargs: dict[str, Any] = {}
    target_kwargs: dict[str, Any] = {}
    for targets, flag, _ in _FLAGS:
        value = getattr(ns, flag)
        if value is None:
            continue
        if target_name not in targets.split():
            owners = ", ".join(sorted(targets.split()))
            raise flags.UsageError(
                f"--{flag} does not apply to the {target_name} target (it is for: {owners})"
            )
        if flag in _SPEC_FIELDS:
            spec_kwargs[flag] = value
        elif flag == "sbatch_arg":
            target_kwargs["sbatch_args"] = tuple(value)
        else:
            target_kwargs[flag] = value
    if ns.mesh is not None:
        spec_kwargs.update(partitioning.parse_mesh(ns.mesh))
    if ns.env:  # flags add to gin's env instead of replacing it
        spec_kwargs["env"] = {**_configured(LaunchSpec, {}).env, **common.parse_env(ns.env)}
    if command:
        spec_kwargs["command"] = tuple(command)
    spec = _configured(LaunchSpec, spec_kwargs)
    target = _configured(_TARGET_CLASSES[target_name], target_kwargs)

    # Fill what the target determines (values given by flag or gin are checked instead).
    if target_name == "tpu" and target.accelerator_type:
        spec = _fill_from_tpu(spec, spec_kwargs, target.accelerator_type)
    elif target_name == "gke" and target.accelerator and target.is_tpu:
        spec = _fill_from_tpu(spec, spec_kwargs, target.accelerator)
    elif target_name == "slurm" and target.one_process_per_device:
        spec = dataclasses.replace(spec, processes_per_host=spec.devices_per_host)
    elif target_name == "local":
        target.validate()
        spec = dataclasses.replace(
            spec, num_hosts=target.num_processes, devices_per_host=target.devices_per_process
        )
    return spec, target


def _fill_from_tpu(spec: LaunchSpec, flagged: Any, accelerator_type: str) -> LaunchSpec:
    """Hosts and devices per host from the TPU type where no flag or gin binding gave them."""
    s = tpu.tpu_slice(accelerator_type)
    fill = {"num_hosts": s.hosts, "devices_per_host": s.devices_per_host}
    given = {k for k in fill if k in flagged or flags.is_bound(f"LaunchSpec.{k}")}
    return dataclasses.replace(spec, **{k: v for k, v in fill.items() if k not in given})


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `flags -- command` at the first `--`."""
    argv = list(argv)
    i = argv.index("--") if "--" in argv else len(argv)
    return argv[:i], argv[i + 1 :]


def main(argv: Sequence[str]) -> int:
    flag_argv, command = split_command(argv)
    parser = make_parser()
    args = flags.parse_args(parser, flag_argv)
    flags.setup_gin(args)
    ns = args.namespace
    if command and ns.command is not None:
        raise flags.UsageError("give the command either after `--` or with --command, not both")
    if ns.command is not None:
        command = shlex.split(ns.command)
    try:
        spec, target = build(ns.target, ns, command)
        return _dispatch(ns.target, spec, target, dry_run=ns.dry_run)
    except ValueError as e:  # LaunchError, a bad --mesh
        raise flags.UsageError(flags.one_line(e)) from e


def _dispatch(name: str, spec: LaunchSpec, target: Any, *, dry_run: bool) -> int:
    if name == "local":
        spec.validate()
        env = dict(spec.env)
        if spec.mesh_given:
            env[common.ENV_MESH] = spec.mesh_env_value()
        args = (spec.command, target.num_processes, target.devices_per_process, target.log_dir)
        args += (target.max_restarts, env)
        if dry_run:
            sys.stdout.write(local.describe(*args))
            return 0
        return local.run_local(*args, term_timeout_s=target.term_timeout_s, echo=sys.stdout)
    plan_fn, describe, run = {
        "tpu": (tpu.tpu_plan, tpu.describe, tpu.run_tpu),
        "gke": (gke.gke_plan, gke.describe, gke.run_gke),
        "slurm": (slurm.slurm_plan, slurm.describe, slurm.run_slurm),
    }[name]
    plan = plan_fn(spec, target)
    if dry_run:
        sys.stdout.write(describe(plan))
        return 0
    return run(plan)
