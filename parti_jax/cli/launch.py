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
TARGETS = ("tpu", "gke", "slurm", "local")
ALL = frozenset(TARGETS)

# flag dest -> (targets it applies to, {target: field of that target's dataclass})
# Fields of LaunchSpec are listed under the key "spec".
_FLAGS: dict[str, tuple[frozenset[str], dict[str, str]]] = {
    "name": (ALL, {"spec": "name"}),
    "num_hosts": (frozenset({"gke", "slurm", "tpu"}), {"spec": "num_hosts"}),
    "num_slices": (frozenset({"gke", "tpu"}), {"spec": "num_slices"}),
    "devices_per_host": (frozenset({"gke", "slurm", "tpu"}), {"spec": "devices_per_host"}),
    "max_restarts": (
        frozenset({"tpu", "gke", "local"}),
        {t: "max_restarts" for t in ("tpu", "gke", "local")},
    ),
    "log_dir": (
        frozenset({"tpu", "slurm", "local"}),
        {t: "log_dir" for t in ("tpu", "slurm", "local")},
    ),
    "spot": (frozenset({"tpu", "gke"}), {"tpu": "spot", "gke": "spot"}),
    "script": (frozenset({"tpu", "slurm"}), {"tpu": "script", "slurm": "script"}),
    # tpu
    "zone": (frozenset({"tpu"}), {"tpu": "zone"}),
    "project": (frozenset({"tpu"}), {"tpu": "project"}),
    "accelerator_type": (frozenset({"tpu"}), {"tpu": "accelerator_type"}),
    "runtime_version": (frozenset({"tpu"}), {"tpu": "runtime_version"}),
    "queued": (frozenset({"tpu"}), {"tpu": "queued"}),
    "install_command": (frozenset({"tpu"}), {"tpu": "install_command"}),
    "package": (frozenset({"tpu"}), {"tpu": "package"}),
    "install": (frozenset({"tpu"}), {"tpu": "install"}),
    "remote_log": (frozenset({"tpu"}), {"tpu": "remote_log"}),
    "poll_seconds": (frozenset({"tpu"}), {"tpu": "poll_seconds"}),
    "delete_at_end": (frozenset({"tpu"}), {"tpu": "delete_at_end"}),
    # gke
    "image": (frozenset({"gke"}), {"gke": "image"}),
    "accelerator": (frozenset({"gke"}), {"gke": "accelerator"}),
    "topology": (frozenset({"gke"}), {"gke": "topology"}),
    "namespace": (frozenset({"gke"}), {"gke": "namespace"}),
    "coordinator_port": (frozenset({"gke"}), {"gke": "coordinator_port"}),
    "termination_grace_seconds": (frozenset({"gke"}), {"gke": "termination_grace_seconds"}),
    "host_network": (frozenset({"gke"}), {"gke": "host_network"}),
    "service_account": (frozenset({"gke"}), {"gke": "service_account"}),
    "manifest": (frozenset({"gke"}), {"gke": "manifest"}),
    # slurm
    "partition": (frozenset({"slurm"}), {"slurm": "partition"}),
    "account": (frozenset({"slurm"}), {"slurm": "account"}),
    "time": (frozenset({"slurm"}), {"slurm": "time"}),
    "gpus": (frozenset({"slurm"}), {"slurm": "gpus"}),
    "one_process_per_device": (frozenset({"slurm"}), {"slurm": "one_process_per_device"}),
    "cpus_per_task": (frozenset({"slurm"}), {"slurm": "cpus_per_task"}),
    "port": (frozenset({"slurm"}), {"slurm": "port"}),
    "signal_seconds": (frozenset({"slurm"}), {"slurm": "signal_seconds"}),
    "requeue": (frozenset({"slurm"}), {"slurm": "requeue"}),
    "setup": (frozenset({"slurm"}), {"slurm": "setup"}),
    "sbatch_arg": (frozenset({"slurm"}), {"slurm": "sbatch_args"}),
    # local
    "num_processes": (frozenset({"local"}), {"local": "num_processes"}),
    "devices_per_process": (frozenset({"local"}), {"local": "devices_per_process"}),
    "term_timeout_s": (frozenset({"local"}), {"local": "term_timeout_s"}),
}
_TARGET_CLASSES = {
    "tpu": tpu.TpuTarget,
    "gke": gke.GkeTarget,
    "slurm": slurm.SlurmTarget,
    "local": local.LocalTarget,
}


def make_parser() -> argparse.ArgumentParser:
    parser = flags.make_parser("launch", DESCRIPTION, workdir=False)
    parser.usage = "parti-jax launch {tpu,gke,slurm,local} [flags] [--dry_run] -- COMMAND ..."
    parser.add_argument("target", choices=TARGETS, help="where to run")
    parser.add_argument(
        "--command", default=None, help="the command (shell words), instead of `-- COMMAND`"
    )
    parser.add_argument("--dry_run", action="store_true", help="print what would run; run nothing")
    bool_flag = {"action": argparse.BooleanOptionalAction, "default": None}
    job = parser.add_argument_group("job (LaunchSpec)")
    job.add_argument(
        "--name", default=None, help="job / TPU / JobSet name (lowercase, digits, '-')"
    )
    job.add_argument("--num_hosts", type=int, default=None, help="hosts per slice (gke GPU, slurm)")
    job.add_argument(
        "--num_slices", type=int, default=None, help="TPU slices over DCN (multi-slice)"
    )
    job.add_argument(
        "--devices_per_host", type=int, default=None, help="GPUs per node (gke GPU, slurm)"
    )
    job.add_argument(
        "--mesh", default=None, help="mesh degrees, e.g. data=2,fsdp=4,tensor=1,dcn_data=2"
    )
    job.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for every process; repeatable"
    )
    shared = parser.add_argument_group("shared by several targets")
    shared.add_argument("--max_restarts", type=int, default=None, help="restarts after a lost run")
    shared.add_argument("--log_dir", default=None, help="local folder for logs")
    shared.add_argument("--spot", **bool_flag, help="spot capacity (tpu, gke)")
    shared.add_argument("--script", default=None, help="where to write the generated script")
    g = parser.add_argument_group("tpu (TpuTarget)")
    g.add_argument("--zone", default=None)
    g.add_argument("--project", default=None)
    g.add_argument("--accelerator_type", default=None, help=f"e.g. {tpu.EXAMPLES}")
    g.add_argument("--runtime_version", default=None)
    g.add_argument("--queued", **bool_flag, help="use queued resources")
    g.add_argument("--install_command", default=None, help="run on every worker before the command")
    g.add_argument("--package", default=None, help="pip requirement installed on every worker")
    g.add_argument(
        "--install", **bool_flag, help="install the package (--no-install: image has it)"
    )
    g.add_argument("--remote_log", default=None, help="log file on every worker")
    g.add_argument("--poll_seconds", type=int, default=None)
    g.add_argument("--delete_at_end", **bool_flag, help="delete the slice when the run ends")
    g = parser.add_argument_group("gke (GkeTarget)")
    g.add_argument("--image", default=None, help="container image with parti_jax installed")
    g.add_argument(
        "--accelerator", default=None, help="TPU type (v5litepod-16) or GPU (nvidia-h100-80gb)"
    )
    g.add_argument("--topology", default=None, help="TPU node pool topology, e.g. 4x4")
    g.add_argument("--namespace", default=None)
    g.add_argument("--coordinator_port", type=int, default=None)
    g.add_argument("--termination_grace_seconds", type=int, default=None)
    g.add_argument("--host_network", **bool_flag)
    g.add_argument("--service_account", default=None)
    g.add_argument("--manifest", default=None, help="where to write the JobSet YAML")
    g = parser.add_argument_group("slurm (SlurmTarget)")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    g.add_argument("--gpus", **bool_flag, help="--no-gpus for CPU-only nodes")
    g.add_argument("--one_process_per_device", **bool_flag, help="one task per GPU")
    g.add_argument("--cpus_per_task", type=int, default=None)
    g.add_argument("--port", type=int, default=None, help="coordinator port (default: from job id)")
    g.add_argument("--signal_seconds", type=int, default=None)
    g.add_argument("--requeue", **bool_flag)
    g.add_argument("--setup", default=None, help="shell lines before srun")
    g.add_argument("--sbatch_arg", action="append", default=None, help="extra #SBATCH option")
    g = parser.add_argument_group("local (LocalTarget)")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--devices_per_process", type=int, default=None)
    g.add_argument("--term_timeout_s", type=float, default=None)
    return parser


def _configured(cls: type, kwargs: dict[str, Any]) -> Any:
    """`cls(**kwargs)` with gin bindings applied underneath, as a plain dataclass."""
    try:
        obj = gin.get_configurable(cls)(**kwargs)
    except TypeError as e:
        raise flags.UsageError(f"{cls.__name__}: {e}") from e
    return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})


def build(
    target_name: str, ns: argparse.Namespace, command: Sequence[str]
) -> tuple[LaunchSpec, Any]:
    """The LaunchSpec and the target object from flags (over gin bindings)."""
    spec_kwargs: dict[str, Any] = {}
    target_kwargs: dict[str, Any] = {}
    for dest, (targets, fields) in _FLAGS.items():
        value = getattr(ns, dest)
        if value is None:
            continue
        if target_name not in targets:
            owners = ", ".join(sorted(targets))
            raise flags.UsageError(
                f"--{dest} does not apply to the {target_name} target (it is for: {owners})"
            )
        if "spec" in fields:
            spec_kwargs[fields["spec"]] = value
        else:
            target_kwargs[fields[target_name]] = tuple(value) if dest == "sbatch_arg" else value
    if ns.mesh is not None:
        spec_kwargs.update(partitioning.parse_mesh(ns.mesh))
    if ns.env:
        spec_kwargs["env"] = common.parse_env(ns.env)
    if command:
        spec_kwargs["command"] = tuple(command)
    spec = _configured(LaunchSpec, spec_kwargs)
    if "env" in spec_kwargs and ns.env:
        # Flags add to gin's env instead of replacing it.
        gin_env = _configured(LaunchSpec, {}).env
        spec = dataclasses.replace(spec, env={**gin_env, **spec_kwargs["env"]})
    target = _configured(_TARGET_CLASSES[target_name], target_kwargs)

    # Fill what the target determines (values given by flag or gin are checked instead).
    given = {
        k
        for k in ("num_hosts", "devices_per_host")
        if k in spec_kwargs or flags.is_bound(f"LaunchSpec.{k}")
    }
    if target_name == "tpu" and target.accelerator_type:
        spec = _fill_from_tpu(spec, given, target.accelerator_type)
    elif target_name == "gke" and target.accelerator and target.is_tpu:
        spec = _fill_from_tpu(spec, given, target.accelerator)
    elif target_name == "slurm" and target.one_process_per_device:
        spec = dataclasses.replace(spec, processes_per_host=spec.devices_per_host)
    elif target_name == "local":
        target.validate()
        spec = dataclasses.replace(
            spec, num_hosts=target.num_processes, devices_per_host=target.devices_per_process
        )
    return spec, target


def _fill_from_tpu(spec: LaunchSpec, given: set[str], accelerator_type: str) -> LaunchSpec:
    s = tpu.tpu_slice(accelerator_type)
    changes = {}
    if "num_hosts" not in given:
        changes["num_hosts"] = s.hosts
    if "devices_per_host" not in given:
        changes["devices_per_host"] = s.devices_per_host
    return dataclasses.replace(spec, **changes)


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `flags -- command` at the first `--`."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


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
        raise flags.UsageError(str(e)) from e


def _dispatch(name: str, spec: LaunchSpec, target: Any, *, dry_run: bool) -> int:
    if name != "local":
        plan_fn, describe, run = {
            "tpu": (
                tpu.tpu_plan,
                tpu.tpu_script,
                lambda plan: tpu.run_tpu(plan, target.script or f"{spec.name}.tpu.sh"),
            ),
            "gke": (gke.gke_plan, gke.describe, gke.run_gke),
            "slurm": (slurm.slurm_plan, slurm.describe, slurm.run_slurm),
        }[name]
        plan = plan_fn(spec, target)
        if dry_run:
            sys.stdout.write(describe(plan))
            return 0
        return run(plan)
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
