"""SLURM: an sbatch script whose `srun` runs the same command as every task of the job.

The coordinator is the first node of the allocation
(`scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1`), the process id is
SLURM_PROCID, the process count SLURM_NTASKS. (JAX's own SLURM detection reads
the same variables, so `jax.distributed.initialize()` without arguments would
agree.) `--signal=B:TERM@<s>` delivers SIGTERM to the batch shell before the
time limit; the shell forwards it to srun, whose tasks (our trainer) save a
checkpoint, and then requeues the job (`--requeue`), which resumes from it.
Preemption by a higher-priority job requeues it the same way.

Installing (`--venv=/shared/venvs/parti_jax-<version>`): the batch script first runs
a generated set-up script (`launch/install.py`) that makes that Python 3.11 venv on
the shared filesystem, installs the wheel from `scripts/build_wheel.sh` and the
jax for the nodes (`jax[cuda12]==<pin>`, or `jax==<pin>` with `--no-gpus`) with
`-c constraints.txt`, and puts it first on PATH for every task. The install is
skipped when the venv already has that wheel (requeues, later jobs).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

from parti_jax.launch import common, install
from parti_jax.launch.common import LaunchError, LaunchSpec


@dataclasses.dataclass(frozen=True)
class SlurmTarget:
    """An allocation on a SLURM cluster (the `slurm` flags / `SlurmTarget.*` gin bindings)."""

    partition: str = ""  # --partition; empty: the cluster default
    account: str = ""  # --account
    time: str = ""  # --time limit, e.g. '24:00:00'; empty: the partition default
    gpus: bool = True  # False: CPU-only nodes (no --gpus-per-node)
    one_process_per_device: bool = False  # True: one task per GPU; False: one task per node
    cpus_per_task: int = 0  # --cpus-per-task; 0: leave it to SLURM
    port: int = 0  # coordinator port; 0: derived from the job id (no clash between jobs)
    log_dir: str = "slurm_logs"  # where %x-%j.out goes (created before sbatch)
    signal_seconds: int = 120  # SIGTERM this long before the time limit
    requeue: bool = True  # requeue after the time-limit signal or a preemption
    setup: str = ""  # shell lines run before srun, e.g. 'source ~/venv/bin/activate'
    sbatch_args: tuple[str, ...] = ()  # extra '#SBATCH' options, e.g. ('--exclusive',)
    script: str = ""  # where to write the script; empty: <name>.sbatch
    # Install parti_jax into a venv on the shared filesystem (empty: `setup` provides it).
    venv: str = ""  # e.g. '/shared/venvs/parti_jax-0.1.0'
    wheel: str = ""  # empty: dist/parti_jax-<version>-py3-none-any.whl
    constraints: str = ""  # empty: constraints.txt next to the wheel
    python: str = ""  # a Python 3.11 on the nodes (e.g. after `module load`); empty: uv
    jax: str = ""  # jax requirement; empty: jax[cuda12]==<pin> (jax==<pin> with --no-gpus)
    extras: str = ""  # parti_jax extras, e.g. 'data'

    def worker_install(self) -> install.WorkerInstall:
        venv = self.venv
        if venv.startswith("~/"):
            venv = "$HOME/" + venv[2:]
        elif not venv.startswith("$"):
            venv = os.path.abspath(venv)
        return install.WorkerInstall(
            wheel=self.wheel,
            constraints=self.constraints,
            accelerator="cuda" if self.gpus else "cpu",
            venv=venv,
            python=self.python,
            jax=self.jax,
            extras=self.extras,
        )

    def validate(self, spec: LaunchSpec) -> None:
        if self.one_process_per_device and spec.processes_per_host != spec.devices_per_host:
            raise LaunchError(
                f"SlurmTarget.one_process_per_device needs LaunchSpec.processes_per_host "
                f"({spec.processes_per_host}) == devices_per_host ({spec.devices_per_host})"
            )
        if not self.one_process_per_device and spec.processes_per_host != 1:
            raise LaunchError(
                f"LaunchSpec.processes_per_host is {spec.processes_per_host}: on SLURM use 1 "
                "(one task per node) or --one_process_per_device (one task per GPU)"
            )
        if spec.num_slices != 1:
            raise LaunchError(
                f"LaunchSpec.num_slices is {spec.num_slices}: slices are a TPU notion; on "
                "SLURM set --num_hosts to the node count and leave --num_slices at 1"
            )
        if self.signal_seconds < 0 or self.cpus_per_task < 0 or not 0 <= self.port < 65536:
            raise LaunchError(
                "SlurmTarget.signal_seconds and cpus_per_task must be >= 0, port in [0, 65535]"
            )
        for arg in self.sbatch_args:
            if not arg.startswith("--") or "\n" in arg:
                raise LaunchError(f"SlurmTarget.sbatch_args: {arg!r} is not one '--option[=value]'")
        if self.venv:
            self.worker_install().validate()
        elif any((self.wheel, self.constraints, self.python, self.jax, self.extras)):
            raise LaunchError(
                "--wheel/--constraints/--python/--jax/--extras install into a venv: pass "
                "--venv=/shared/PATH (on the filesystem every node sees)"
            )
        spec.validate()


def setup_path(spec: LaunchSpec, target: SlurmTarget) -> str:
    """Where the set-up script goes: next to the batch script, as an absolute path (SLURM
    runs a spooled copy of the batch script, so paths relative to it would not resolve)."""
    script = os.path.abspath(target.script or f"{spec.name}.sbatch")
    return str(Path(script).parent / f"{spec.name}.setup.sh")


def sbatch_script(spec: LaunchSpec, target: SlurmTarget) -> str:
    """The batch script: #SBATCH header, install (with --venv), env, signal trap, srun."""
    target.validate(spec)
    gpus = target.gpus
    tasks_per_node = spec.processes_per_host
    log = f"{target.log_dir}/%x-%j.out"
    head = [
        "#!/bin/bash",
        f"# Generated by `parti-jax launch slurm` for job {spec.name}: {spec.num_hosts} node(s) x "
        f"{tasks_per_node} task(s), {spec.num_processes} processes, "
        f"{spec.devices_per_host} device(s) per node.",
        f"#SBATCH --job-name={spec.name}",
        f"#SBATCH --nodes={spec.num_hosts}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
    ]
    if gpus:
        head.append(f"#SBATCH --gpus-per-node={spec.devices_per_host}")
    if target.cpus_per_task:
        head.append(f"#SBATCH --cpus-per-task={target.cpus_per_task}")
    if target.partition:
        head.append(f"#SBATCH --partition={target.partition}")
    if target.account:
        head.append(f"#SBATCH --account={target.account}")
    if target.time:
        head.append(f"#SBATCH --time={target.time}")
    head += [f"#SBATCH --output={log}", "#SBATCH --open-mode=append"]
    if target.requeue:
        head += ["#SBATCH --requeue", f"#SBATCH --signal=B:TERM@{target.signal_seconds}"]
    head += [f"#SBATCH {a}" for a in target.sbatch_args]

    port = str(target.port) if target.port else "$((SLURM_JOB_ID % 4096 + 61440))"
    env = spec.process_env()
    exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    per_task = f"export {common.ENV_PROCESS_ID}=$SLURM_PROCID"
    if target.one_process_per_device and gpus:
        per_task += " CUDA_VISIBLE_DEVICES=$SLURM_LOCALID"
    task_line = f"{per_task} && exec {spec.shell_command()}"
    body = [
        "",
        *([target.setup] if target.setup else []),
        "set -uo pipefail",
    ]
    if target.venv:
        venv = target.worker_install().venv
        body += [
            "# The wheel and its pins into the shared venv (a no-op once installed).",
            f"bash {shlex.quote(setup_path(spec, target))} || "
            '{ echo "parti-jax: installing parti_jax failed (see above)" >&2; exit 1; }',
            f'export PATH={install.bash_value(venv + "/bin")}:"$PATH"',
        ]
    body += [
        f"PORT={port}",
        f'export {common.ENV_COORDINATOR}="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
        '| head -n 1):${PORT}"',
        *exports,
        f'if [[ "${{SLURM_NTASKS}}" != {spec.num_processes} ]]; then',
        f'  echo "parti-jax: expected {spec.num_processes} tasks, SLURM gave $SLURM_NTASKS" >&2',
        "  exit 1",
        "fi",
        'echo "parti-jax: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), '
        f'coordinator ${common.ENV_COORDINATOR}" >&2',
        f'export {common.ENV_RESTART}="${{SLURM_RESTART_COUNT:-0}}"',
    ]
    if target.requeue:
        body += [
            "on_term() {",
            '  echo "parti-jax: SIGTERM (time limit or preemption): the trainer saves a '
            'checkpoint, then the job is requeued" >&2',
            '  kill -TERM "$SRUN_PID" 2>/dev/null',
            '  wait "$SRUN_PID"',
            '  scontrol requeue "$SLURM_JOB_ID" || true',
            "  exit 0",
            "}",
            "trap on_term TERM",
        ]
    body += [
        f"srun --kill-on-bad-exit=1 --label bash -c {shlex.quote(task_line)} &",
        "SRUN_PID=$!",
        # `wait` returns early when a trapped signal arrives; the trap then runs.
        'wait "$SRUN_PID"',
    ]
    return "\n".join(head + body) + "\n"


@dataclasses.dataclass(frozen=True)
class SlurmPlan:
    spec: LaunchSpec
    target: SlurmTarget
    script_path: str
    script: str
    submit: tuple[str, ...]
    setup_path: str = ""  # the set-up script the batch script runs ('' without --venv)
    setup_script: str = ""


def slurm_plan(spec: LaunchSpec, target: SlurmTarget) -> SlurmPlan:
    """Builds (without running) the batch script, the set-up script and the sbatch command."""
    path = target.script or f"{spec.name}.sbatch"
    script = sbatch_script(spec, target)
    setup, setup_text = "", ""
    if target.venv:
        worker = target.worker_install()
        setup = setup_path(spec, target)
        setup_text = install.setup_script(
            worker,
            wheel=worker.wheel_path,
            constraints=worker.constraints_path,
            origin="parti-jax launch slurm",
        )
    return SlurmPlan(
        spec=spec,
        target=target,
        script_path=path,
        script=script,
        submit=("sbatch", path),
        setup_path=setup,
        setup_script=setup_text,
    )


def describe(plan: SlurmPlan) -> str:
    text = f"# {plan.script_path}\n{plan.script}"
    if plan.setup_path:
        text += f"# ---- {plan.setup_path}: run by the batch script ----\n{plan.setup_script}"
    return text + (
        f"# submit:\nmkdir -p {shlex.quote(plan.target.log_dir)}\n{shlex.join(plan.submit)}\n"
    )


def run_slurm(plan: SlurmPlan) -> int:
    """Writes the scripts, creates the log folder and submits with sbatch."""
    common.require_binary("sbatch")
    if plan.setup_path:
        plan.target.worker_install().check_files()
    os.makedirs(plan.target.log_dir, exist_ok=True)
    path = Path(plan.script_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if plan.setup_path:
        Path(plan.setup_path).write_text(plan.setup_script)
    path.write_text(plan.script)
    return subprocess.call(list(plan.submit))
