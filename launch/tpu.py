"""Cloud TPU VM pod slices: create, install, run the same command on every worker, restart.

Every worker of a slice runs the same command over `gcloud compute tpus tpu-vm
ssh --worker=all`. The trainer then calls `jax.distributed.initialize()` with no
arguments but the process count: JAX reads the coordinator and process id from
the TPU VM metadata (and MEGASCALE_* for multi-slice, which queued resources
set), so the launcher exports PARTI_JAX_NUM_PROCESSES and
PARTI_JAX_AUTO_DETECT=1. A generated bash script drives the run: after a spot
preemption it re-creates the queued resource and re-runs the same command, and
the trainer resumes from its last checkpoint.

Installing: TPU VM images have Python 3.10 and parti_jax is on no index, so the
driver copies the wheel from `scripts/build_wheel.sh`, constraints.txt and a
generated set-up script (`launch/install.py`) to `~/parti_jax/dist/` on every
worker and runs the script there: a Python 3.11 venv in `~/parti_jax/venv` with
the wheel and `jax[tpu]==<pin>` installed `-c constraints.txt`. The command then
runs with that venv first on PATH.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
from pathlib import Path

from parti_jax.launch import common, install
from parti_jax.launch.common import LaunchError, LaunchSpec


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One accelerator type: how many chips and hosts, and how JAX sees them."""

    accelerator_type: str  # gcloud name, e.g. 'v5litepod-16'
    generation: str  # 'v2', 'v3', 'v4', 'v5litepod', 'v5p', 'v6e'
    chips: int
    hosts: int
    chips_per_host: int
    devices_per_chip: int  # JAX devices per chip: 2 on v2/v3 (one per core), 1 with megacore

    @property
    def devices_per_host(self) -> int:
        return self.chips_per_host * self.devices_per_chip

    @property
    def num_devices(self) -> int:
        return self.chips * self.devices_per_chip


# generation -> (suffix counts TensorCores?, devices per chip, runtime version)
_GENERATIONS = {
    "v2": (True, 2, "tpu-ubuntu2204-base"),
    "v3": (True, 2, "tpu-ubuntu2204-base"),
    "v4": (True, 1, "tpu-ubuntu2204-base"),
    "v5p": (True, 1, "v2-alpha-tpuv5"),
    "v5litepod": (False, 1, "v2-alpha-tpuv5-lite"),
    "v6e": (False, 1, "v2-alpha-tpuv6e"),
}
_SINGLE_HOST_2D = (1, 4, 8)  # v5e / v6e sizes that fit one host
_SIZES_2D = (1, 4, 8, 16, 32, 64, 128, 256)
_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod", "v6": "v6e"}
EXAMPLES = "v4-8, v4-32, v5p-8, v5p-128, v5litepod-8, v5litepod-16, v6e-8, v6e-256, v3-32"


def tpu_slice(accelerator_type: str) -> TpuSlice:
    """Chips, hosts and devices of a gcloud accelerator type (e.g. 'v4-32', 'v6e-16')."""
    m = re.fullmatch(r"(v\d[a-z]*)-(\d+)", accelerator_type.strip())
    if not m:
        raise LaunchError(
            f"accelerator type {accelerator_type!r} is not GENERATION-SIZE; examples: {EXAMPLES}"
        )
    gen, size = m.group(1), int(m.group(2))
    if gen in _ALIASES:
        raise LaunchError(
            f"accelerator type {accelerator_type!r}: gcloud calls it "
            f"'{_ALIASES[gen]}-{size}'; pass --accelerator_type={_ALIASES[gen]}-{size}"
        )
    if gen not in _GENERATIONS:
        raise LaunchError(
            f"accelerator type {accelerator_type!r}: unknown TPU generation {gen!r} "
            f"(known: {', '.join(_GENERATIONS)}); examples: {EXAMPLES}"
        )
    counts_cores, devices_per_chip, _ = _GENERATIONS[gen]
    if counts_cores:
        # v2/v3/v4/v5p name TensorCores: 2 per chip, 4 chips per host.
        if size < 8 or size % 8:
            raise LaunchError(
                f"accelerator type {accelerator_type!r}: {gen} sizes count TensorCores and "
                f"are multiples of 8 ({gen}-8 is one host of 4 chips)"
            )
        chips = size // 2
        chips_per_host = 4
    else:
        # v5e/v6e name chips: up to 8 on one host, 4 per host beyond that.
        if size not in _SIZES_2D:
            raise LaunchError(
                f"accelerator type {accelerator_type!r}: {gen} sizes are chips, one of "
                f"{', '.join(map(str, _SIZES_2D))}"
            )
        chips = size
        chips_per_host = size if size in _SINGLE_HOST_2D else 4
    return TpuSlice(
        accelerator_type=f"{gen}-{size}",
        generation=gen,
        chips=chips,
        hosts=chips // chips_per_host,
        chips_per_host=chips_per_host,
        devices_per_chip=devices_per_chip,
    )


def default_runtime_version(accelerator_type: str) -> str:
    return _GENERATIONS[tpu_slice(accelerator_type).generation][2]


def spec_for_slice(spec: LaunchSpec, accelerator_type: str) -> LaunchSpec:
    """`spec` with hosts and devices per host taken from the accelerator type."""
    s = tpu_slice(accelerator_type)
    return dataclasses.replace(
        spec, num_hosts=s.hosts, devices_per_host=s.devices_per_host, processes_per_host=1
    )


def check_spec_matches_slice(spec: LaunchSpec, accelerator_type: str) -> TpuSlice:
    """Errors (naming both numbers) when the spec disagrees with the accelerator type."""
    s = tpu_slice(accelerator_type)
    if spec.num_hosts != s.hosts:
        raise LaunchError(
            f"{accelerator_type} has {s.hosts} host(s) but LaunchSpec.num_hosts (--num_hosts) "
            f"is {spec.num_hosts}; drop --num_hosts (it follows the accelerator type)"
        )
    if spec.devices_per_host != s.devices_per_host:
        raise LaunchError(
            f"{accelerator_type} has {s.devices_per_host} devices per host but "
            f"LaunchSpec.devices_per_host (--devices_per_host) is {spec.devices_per_host}; "
            "drop --devices_per_host (it follows the accelerator type)"
        )
    if spec.processes_per_host != 1:
        raise LaunchError(
            f"TPU VMs run one process per host, but LaunchSpec.processes_per_host is "
            f"{spec.processes_per_host}; set it to 1"
        )
    return s


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """Where and how to run on Cloud TPU VMs (the `tpu` flags / `TpuTarget.*` gin bindings)."""

    zone: str = ""  # e.g. 'us-central2-b'
    accelerator_type: str = ""  # e.g. 'v4-32', 'v5litepod-16', 'v6e-8'
    project: str = ""  # empty: gcloud's configured project
    runtime_version: str = ""  # empty: the usual image for the generation
    spot: bool = False  # spot capacity; implies queued resources and the restart loop
    queued: bool = False  # create through queued resources (forced for spot and multi-slice)
    install: bool = True  # False: the image already has parti_jax (nothing copied or installed)
    install_command: str = ""  # run on every worker instead of shipping the wheel
    wheel: str = ""  # the wheel to ship; empty: dist/parti_jax-<version>-py3-none-any.whl
    constraints: str = ""  # exact pins; empty: constraints.txt next to the wheel
    python: str = ""  # a Python 3.11 on the workers; empty: uv fetches one (images have 3.10)
    jax: str = ""  # jax requirement; empty: jax[tpu]==<constraints.txt's jax pin>
    extras: str = ""  # parti_jax extras on the workers, e.g. 'data' (TensorFlow, SeqIO)
    remote_log: str = "/tmp/parti_jax/run.log"  # log file on every worker
    log_dir: str = "tpu_logs"  # local folder for the collected worker logs
    max_restarts: int = 10  # re-creations after a lost (preempted) slice
    poll_seconds: int = 60  # queued-resource polling interval
    delete_at_end: bool = True  # delete the slice when the run ends (logs are collected first)
    script: str = ""  # where to write the driver script; empty: <name>.tpu.sh

    @property
    def uses_queued_resources(self) -> bool:
        return self.queued or self.spot

    @property
    def ships_wheel(self) -> bool:
        return self.install and not self.install_command

    def worker_install(self) -> install.WorkerInstall:
        return install.WorkerInstall(
            wheel=self.wheel,
            constraints=self.constraints,
            accelerator="tpu",
            venv=f"$HOME/{REMOTE_VENV}",
            python=self.python,
            jax=self.jax,
            extras=self.extras,
        )

    def validate(self, spec: LaunchSpec) -> TpuSlice:
        if not self.zone:
            raise LaunchError("the tpu target needs a zone: pass --zone (or bind TpuTarget.zone)")
        if not self.accelerator_type:
            raise LaunchError(
                "the tpu target needs an accelerator type: pass --accelerator_type "
                f"(or bind TpuTarget.accelerator_type); examples: {EXAMPLES}"
            )
        if self.max_restarts < 0 or self.poll_seconds < 1:
            raise LaunchError("TpuTarget.max_restarts must be >= 0 and poll_seconds >= 1")
        s = check_spec_matches_slice(spec, self.accelerator_type)
        spec.validate()
        if self.ships_wheel:
            self.worker_install().validate()
        return s


# On every worker, relative to its home directory: what the driver copies, and the venv.
REMOTE_DIST = f"{install.REMOTE_DIR}/dist"
REMOTE_VENV = f"{install.REMOTE_DIR}/venv"


@dataclasses.dataclass(frozen=True)
class TpuPlan:
    """Every gcloud command of a TPU run, as argv lists (shell-quoted by `script`)."""

    spec: LaunchSpec
    target: TpuTarget
    slice: TpuSlice
    queued_resource: str  # queued resource id ('' without queued resources)
    nodes: tuple[str, ...]  # TPU node names, one per slice
    create: tuple[str, ...]
    state: tuple[str, ...]  # prints ACTIVE (queued) / READY (node) when healthy
    healthy_state: str
    install: tuple[tuple[tuple[str, ...], ...], ...]  # per node: steps run one after another
    run: tuple[tuple[str, ...], ...]  # one per node: the same command on --worker=all
    logs: tuple[tuple[tuple[str, ...], str], ...]  # (argv, local file) per node and worker
    delete: tuple[str, ...]
    remote_command: str  # the shell line every worker runs
    script_path: str  # where run_tpu writes the driver script
    setup_path: str  # where run_tpu writes the worker set-up script ('' when none is shipped)
    setup_script: str  # its text
    shipped: tuple[str, ...]  # local files copied to ~/parti_jax/dist/ on every worker


def _gcloud(target: TpuTarget, *words: str) -> list[str]:
    argv = ["gcloud", "compute", "tpus", *words, f"--zone={target.zone}"]
    if target.project:
        argv.append(f"--project={target.project}")
    return argv


def _ssh(target: TpuTarget, node: str, worker: str, command: str) -> tuple[str, ...]:
    return (*_gcloud(target, "tpu-vm", "ssh", node), f"--worker={worker}", f"--command={command}")


def _scp_all(target: TpuTarget, node: str, files: tuple[str, ...], dest: str) -> tuple[str, ...]:
    return (*_gcloud(target, "tpu-vm", "scp", *files, f"{node}:{dest}/"), "--worker=all")


def remote_run_command(spec: LaunchSpec, target: TpuTarget) -> str:
    """The shell line every worker runs: env, the command, output appended to the log."""
    # No coordinator / process id: JAX reads them from the TPU VM metadata.
    env = spec.process_env(auto_detect=True)
    log = target.remote_log
    # The venv the set-up script made; ~/.local/bin for a --install_command with pip --user.
    # ssh commands get no login PATH.
    return (
        f'export PATH="$HOME/{REMOTE_VENV}/bin:$HOME/.local/bin:$PATH" '
        f"{common.env_assignments(env)} && "
        f"mkdir -p {shlex.quote(os.path.dirname(log) or '.')} && "
        f"{spec.shell_command()} 2>&1 | tee -a {shlex.quote(log)}; "
        "exit ${PIPESTATUS[0]}"
    )


def tpu_plan(spec: LaunchSpec, target: TpuTarget) -> TpuPlan:
    """Builds (without running) every command of a TPU VM run; validates first."""
    s = target.validate(spec)
    name = spec.name
    runtime = target.runtime_version or default_runtime_version(target.accelerator_type)
    queued = target.uses_queued_resources or spec.num_slices > 1
    nodes = (
        (name,) if spec.num_slices == 1 else tuple(f"{name}-{i}" for i in range(spec.num_slices))
    )
    if queued:
        create = _gcloud(target, "queued-resources", "create", name)
        if spec.num_slices == 1:
            create.append(f"--node-id={name}")
        else:
            create += [f"--node-count={spec.num_slices}", f"--node-prefix={name}"]
        create += [f"--accelerator-type={target.accelerator_type}", f"--runtime-version={runtime}"]
        state = (
            *_gcloud(target, "queued-resources", "describe", name),
            "--format=value(state.state)",
        )
        healthy = "ACTIVE"
        delete = (*_gcloud(target, "queued-resources", "delete", name), "--force", "--quiet")
    else:
        create = _gcloud(target, "tpu-vm", "create", name)
        create += [f"--accelerator-type={target.accelerator_type}", f"--version={runtime}"]
        state = (*_gcloud(target, "tpu-vm", "describe", name), "--format=value(state)")
        healthy = "READY"
        delete = (*_gcloud(target, "tpu-vm", "delete", name), "--quiet")
    if target.spot:
        create.append("--spot")
    script_path = os.path.abspath(target.script or f"{name}.tpu.sh")
    setup_path, setup_text, shipped = "", "", ()
    if target.ships_wheel:
        worker = target.worker_install()
        setup_path = str(Path(script_path).parent / f"{name}.setup.sh")
        shipped = (worker.wheel_path, worker.constraints_path, setup_path)
        setup_text = install.setup_script(
            worker,
            wheel=os.path.basename(worker.wheel_path),
            constraints=os.path.basename(worker.constraints_path),
            origin="parti-jax launch tpu",
        )
    installs = []
    for node in nodes if target.install else ():
        if target.ships_wheel:
            steps = (
                _ssh(target, node, "all", f"mkdir -p {REMOTE_DIST}"),
                _scp_all(target, node, shipped, REMOTE_DIST),
                _ssh(target, node, "all", f"bash {REMOTE_DIST}/{os.path.basename(setup_path)}"),
            )
        else:
            steps = (_ssh(target, node, "all", target.install_command),)
        installs.append(steps)
    remote = remote_run_command(spec, target)
    run = tuple(_ssh(target, node, "all", remote) for node in nodes)
    logs = tuple(
        (
            _ssh(target, node, str(w), f"cat {shlex.quote(target.remote_log)}"),
            str(Path(target.log_dir) / f"{node}-worker{w}.log"),
        )
        for node in nodes
        for w in range(s.hosts)
    )
    return TpuPlan(
        spec=spec,
        target=target,
        slice=s,
        queued_resource=name if queued else "",
        nodes=nodes,
        create=tuple(create),
        state=state,
        healthy_state=healthy,
        install=tuple(installs),
        run=run,
        logs=logs,
        delete=delete,
        remote_command=remote,
        script_path=script_path,
        setup_path=setup_path,
        setup_script=setup_text,
        shipped=shipped,
    )


def _in_parallel(jobs: tuple[tuple[tuple[str, ...], ...], ...], indent: str = "  ") -> list[str]:
    """Bash lines that run the jobs (each a chain of commands) concurrently; fail if any fails."""
    chains = [f" \\\n{indent}  && ".join(shlex.join(c) for c in job) for job in jobs]
    if len(chains) == 1:
        return [indent + chains[0]]
    lines = [indent + "local pids=() rc=0 p"]
    for job, chain in zip(jobs, chains):
        lines += [f"{indent}{f'({chain})' if len(job) > 1 else chain} &", f"{indent}pids+=($!)"]
    lines.append(f'{indent}for p in "${{pids[@]}}"; do wait "$p" || rc=$?; done')
    lines.append(f"{indent}return $rc")
    return lines


def tpu_script(plan: TpuPlan) -> str:
    """A bash script: create, wait, install, run, collect logs, delete; restart if the slice is lost."""
    spec, target = plan.spec, plan.target
    q = shlex.join
    desc = (
        f"{spec.num_slices} x {plan.slice.accelerator_type} ({plan.slice.hosts} host(s) per "
        f"slice, {plan.slice.devices_per_host} devices per host), {spec.num_processes} processes"
    )
    lines = [
        "#!/usr/bin/env bash",
        f"# Generated by `parti-jax launch tpu` for job {spec.name}: {desc}.",
        "# Every worker runs the same command; JAX finds the coordinator and process ids",
        "# from the TPU metadata. When the slice is lost (spot preemption, maintenance)",
        "# it is re-created and the same command re-run: the run resumes from its last",
        "# checkpoint in its work directory.",
        *(
            [
                f"# Install: {os.path.basename(plan.shipped[0])}, constraints.txt and "
                f"{os.path.basename(plan.setup_path)} are copied to",
                f"# ~/{REMOTE_DIST}/ on every worker; the set-up script makes a Python 3.11 venv "
                f"in ~/{REMOTE_VENV}",
                f"# and installs the wheel{f'[{target.extras}]' if target.extras else ''} and "
                f"{target.worker_install().jax_line()} with -c constraints.txt.",
            ]
            if plan.shipped
            else []
        ),
        "set -uo pipefail",
        f"MAX_RESTARTS={target.max_restarts}",
        f"POLL_SECONDS={target.poll_seconds}",
        "",
        f"create() {{\n  {q(plan.create)}\n}}",
        f"state() {{\n  {q(plan.state)} 2>/dev/null\n}}",
        f'healthy() {{\n  [[ "$(state)" == {plan.healthy_state} ]]\n}}',
        "wait_ready() {",
        "  local s",
        "  while true; do",
        "    s=$(state)",
        '    case "$s" in',
        f"      {plan.healthy_state}) return 0 ;;",
        "      FAILED|SUSPENDING|SUSPENDED|DELETING|PREEMPTED|TERMINATED)",
        f'        echo "parti-jax: {spec.name} is $s" >&2; return 1 ;;',
        "    esac",
        '    echo "parti-jax: waiting for ' + spec.name + ' (state: ${s:-pending})" >&2',
        '    sleep "$POLL_SECONDS"',
        "  done",
        "}",
        "install_workers() {",
        *(_in_parallel(plan.install) if plan.install else ["  true"]),
        "}",
        "run_command() {",
        *_in_parallel(tuple((argv,) for argv in plan.run)),
        "}",
        "collect_logs() {",
        f"  mkdir -p {shlex.quote(target.log_dir)}",
        *[f"  {q(argv)} > {shlex.quote(dest)} || true" for argv, dest in plan.logs],
        f'  echo "parti-jax: worker logs in {target.log_dir}/" >&2',
        "}",
        f"delete() {{\n  {q(plan.delete)}\n}}",
        "",
        "restarts=0",
        "while true; do",
        "  if ! create; then",
        "    if (( restarts == 0 )); then",
        f'      echo "parti-jax: could not create {spec.name}; see the gcloud error above" >&2',
        "      exit 1",
        "    fi",
        "  elif wait_ready; then",
        "    if ! install_workers; then",
        "      if healthy; then",
        '        echo "parti-jax: installing on the workers failed (not a preemption)" >&2',
        "        delete; exit 1",
        "      fi",
        "    else",
        "      run_command; rc=$?",
        "      collect_logs",
        "      if (( rc == 0 )); then",
        f'        echo "parti-jax: {spec.name} finished" >&2',
        *(["        delete"] if target.delete_at_end else []),
        "        exit 0",
        "      fi",
        "      if healthy; then",
        '        echo "parti-jax: the command failed with exit code $rc on a healthy slice '
        '(not a preemption); see the logs" >&2',
        *(["        delete"] if target.delete_at_end else []),
        '        exit "$rc"',
        "      fi",
        "    fi",
        "  fi",
        "  restarts=$((restarts + 1))",
        "  if (( restarts > MAX_RESTARTS )); then",
        f'    echo "parti-jax: {spec.name} was lost again; giving up after $MAX_RESTARTS '
        'restart(s)" >&2',
        "    delete; exit 1",
        "  fi",
        f'  echo "parti-jax: {spec.name} was lost (preempted?); restart $restarts of '
        '$MAX_RESTARTS: re-creating it, the run resumes from its checkpoint" >&2',
        "  delete",
        '  sleep "$POLL_SECONDS"',
        "done",
    ]
    return "\n".join(lines) + "\n"


def describe(plan: TpuPlan) -> str:
    """What `--dry_run` prints: the driver script, then the set-up script it ships."""
    text = f"# {plan.script_path}\n{tpu_script(plan)}"
    if plan.setup_path:
        missing = [p for p in plan.shipped[:2] if not os.path.isfile(p)]
        text += (
            f"# ---- {plan.setup_path}: copied with the wheel and constraints.txt to "
            f"~/{REMOTE_DIST}/ on every worker and run there ----\n{plan.setup_script}"
        )
        if missing:
            text += f"# note: not built yet: {', '.join(missing)}; {install.BUILD_HINT}\n"
    return text


def run_tpu(plan: TpuPlan) -> int:
    """Writes the driver (and set-up) script and runs the driver with bash; returns its exit code."""
    common.require_binary("gcloud")
    bash = common.require_binary("bash")
    if plan.shipped:
        plan.target.worker_install().check_files()
    path = Path(plan.script_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if plan.setup_path:
        Path(plan.setup_path).write_text(plan.setup_script)
    path.write_text(tpu_script(plan))
    path.chmod(0o755)
    return subprocess.call([bash, str(path)])
