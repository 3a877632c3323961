"""What every launch target shares: the job (`LaunchSpec`), mesh checks, the env contract.

parti_jax runs on JAX's own multi-controller runtime: every host runs the SAME
command, and the trainer calls `jax.distributed.initialize()` at start-up when
the environment says there are several processes. The launchers only set that
environment:

- `PARTI_JAX_NUM_PROCESSES=<n>`: the run has n processes (n > 1 means
  multi-process; absent or 1 means single process, no `initialize`).
- `PARTI_JAX_COORDINATOR=<host:port>` and `PARTI_JAX_PROCESS_ID=<i>`: passed to
  `initialize` (local, GKE, SLURM).
- `PARTI_JAX_AUTO_DETECT=1` (Cloud TPU VMs, instead of coordinator and process
  id): the trainer calls `initialize(num_processes=n)` and JAX's own cluster
  detection finds coordinator and process id (TPU VM metadata; MEGASCALE_* for
  multi-slice, which queued resources provide).
- `PARTI_JAX_MESH=data=2,fsdp=4,tensor=1,dcn_data=2,...`: only when mesh degrees
  were given to the launcher: the degrees it checked against the device count,
  so the trainer can fail early when its own mesh differs.
- `PARTI_JAX_RESTART=<k>`: how many times the launcher restarted the run
  (0 on the first attempt); informational.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence

from parti_jax.partitioning import fill_degrees

ENV_COORDINATOR = "PARTI_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "PARTI_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "PARTI_JAX_PROCESS_ID"
ENV_MESH = "PARTI_JAX_MESH"
ENV_RESTART = "PARTI_JAX_RESTART"
ENV_AUTO_DETECT = "PARTI_JAX_AUTO_DETECT"
RESERVED_ENV = (
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ENV_MESH,
    ENV_RESTART,
    ENV_AUTO_DETECT,
)

# JAX's own default coordinator port on Cloud TPU (jax/_src/clusters/cloud_tpu_cluster.py).
DEFAULT_COORDINATOR_PORT = 8482

ICI_AXES = ("data", "fsdp", "tensor")
DCN_AXES = ("dcn_data", "dcn_fsdp", "dcn_tensor")

_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME_LEN = 40  # GKE pod hostnames `<name>-slice-<j>-<i>` must stay under 63 characters.


class LaunchError(ValueError):
    """A launch configuration that cannot work; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """One multi-host job: the command every host runs and the shape of the machine.

    Total processes = num_slices * num_hosts * processes_per_host. A mesh degree
    of -1 takes whatever devices are left (at most one -1 per group).
    """

    command: tuple[str, ...] = ()  # argv run on every host, e.g. ('parti-jax', 'train', ...)
    name: str = "parti-jax"  # job / TPU / JobSet name: lowercase letters, digits, '-'
    num_hosts: int = 1  # hosts (VMs, nodes, pods) per slice
    num_slices: int = 1  # TPU slices joined over the data-centre network (multi-slice)
    processes_per_host: int = 1  # 1: one process drives all local devices; >1: one per GPU
    devices_per_host: int = 1  # accelerator devices one host has (TPU chips x cores, GPUs)
    # Mesh degrees (None: not given). Inside a slice: data, fsdp, tensor; across
    # slices: dcn_*. Missing degrees are 1, except data / dcn_data, which take the
    # devices left over (-1) unless another degree of their group is -1.
    data: int | None = None
    fsdp: int | None = None
    tensor: int | None = None
    dcn_data: int | None = None
    dcn_fsdp: int | None = None
    dcn_tensor: int | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # extra env on every host

    def __post_init__(self) -> None:
        # Accept lists/strings from gin or flags; store an immutable argv.
        command = self.command
        if isinstance(command, str):
            command = tuple(shlex.split(command))
        object.__setattr__(self, "command", tuple(str(c) for c in command))
        object.__setattr__(self, "env", {str(k): str(v) for k, v in dict(self.env).items()})

    # ------------------------------------------------------------------ sizes
    @property
    def num_processes(self) -> int:
        return self.num_slices * self.num_hosts * self.processes_per_host

    @property
    def devices_per_slice(self) -> int:
        return self.num_hosts * self.devices_per_host

    @property
    def devices_per_process(self) -> int:
        return self.devices_per_host // self.processes_per_host

    @property
    def num_devices(self) -> int:
        return self.num_slices * self.devices_per_slice

    # ---------------------------------------------------------------- checks
    def validate(self) -> LaunchSpec:
        """Checks every field; raises LaunchError naming the field and the fix."""
        if not self.command:
            raise LaunchError(
                "no command to run: give it after `--` (parti-jax launch local -- parti-jax "
                "train --gin_file=...) or with --command, or bind LaunchSpec.command in gin"
            )
        if not _NAME_RE.match(self.name) or len(self.name) > MAX_NAME_LEN:
            raise LaunchError(
                f"LaunchSpec.name (--name) {self.name!r} is not a valid job name: use at most "
                f"{MAX_NAME_LEN} lowercase letters, digits and '-', starting with a letter "
                "(GCE, Kubernetes and SLURM all accept that)"
            )
        for field in ("num_hosts", "num_slices", "processes_per_host", "devices_per_host"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise LaunchError(
                    f"LaunchSpec.{field} (--{field}) must be a positive integer, got {value!r}"
                )
        if self.devices_per_host % self.processes_per_host:
            raise LaunchError(
                f"LaunchSpec.processes_per_host={self.processes_per_host} does not divide "
                f"devices_per_host={self.devices_per_host}: each process needs the same number "
                "of devices; use 1 process per host or one per device"
            )
        for key in self.env:
            if not _ENV_NAME_RE.match(key):
                raise LaunchError(
                    f"LaunchSpec.env (--env): {key!r} is not an environment variable name"
                )
            if key in RESERVED_ENV:
                raise LaunchError(
                    f"LaunchSpec.env (--env) may not set {key}: the launcher sets it for each "
                    "process; remove it"
                )
        self.resolved_mesh()
        return self

    @property
    def mesh_given(self) -> bool:
        return any(getattr(self, a) is not None for a in ICI_AXES + DCN_AXES)

    def _group(self, axes: tuple[str, ...]) -> dict[str, int]:
        given = {a: getattr(self, a) for a in axes}
        fill = -1 not in given.values()
        return {
            a: (v if v is not None else (-1 if (a == axes[0] and fill) else 1))
            for a, v in given.items()
        }

    def resolved_mesh(self) -> dict[str, int]:
        """Mesh degrees with -1 filled in; raises LaunchError when they cannot fit the devices."""
        slice_devices = (
            f"the slice's {self.devices_per_slice} devices ({self.num_hosts} host(s) x "
            f"{self.devices_per_host} devices per host)"
        )
        try:
            ici = fill_degrees(
                self._group(ICI_AXES), self.devices_per_slice, slice_devices, "LaunchSpec"
            )
            slices = f"the {self.num_slices} slice(s) (--num_slices)"
            dcn = fill_degrees(self._group(DCN_AXES), self.num_slices, slices, "LaunchSpec")
        except ValueError as e:
            raise LaunchError(str(e)) from None
        return {**ici, **dcn}

    def mesh_env_value(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.resolved_mesh().items())

    # -------------------------------------------------------------- env/shell
    def process_env(
        self,
        *,
        process_id: int | None = None,
        coordinator: str | None = None,
        auto_detect: bool = False,
    ) -> dict[str, str]:
        """The env one process gets: user env, then the PARTI_JAX_* contract."""
        env = dict(self.env)
        env[ENV_NUM_PROCESSES] = str(self.num_processes)
        if auto_detect:
            env[ENV_AUTO_DETECT] = "1"
        if coordinator is not None:
            env[ENV_COORDINATOR] = coordinator
        if process_id is not None:
            env[ENV_PROCESS_ID] = str(process_id)
        if self.mesh_given:
            env[ENV_MESH] = self.mesh_env_value()
        return env

    def shell_command(self) -> str:
        """The command as one shell-quoted string."""
        return shlex.join(self.command)


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """Parses repeated `--env KEY=VALUE` flags."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME_RE.match(key):
            raise LaunchError(
                f"--env {item!r}: write --env NAME=VALUE (NAME a valid variable name)"
            )
        out[key] = value
    return out


def env_assignments(env: Mapping[str, str]) -> str:
    """`K1=v1 K2=v2` with every value shell-quoted (for `export` or `env`)."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


# Where each tool comes from; printed when it is missing.
INSTALL_HINTS = {
    "gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then "
    "run `gcloud auth login` and `gcloud config set project PROJECT`",
    "kubectl": "install kubectl (`gcloud components install kubectl`, or "
    "https://kubernetes.io/docs/tasks/tools/), then `gcloud container clusters get-credentials CLUSTER`",
    "sbatch": "run on a SLURM login node (sbatch comes with SLURM: https://slurm.schedmd.com)",
    "bash": "install bash (the generated TPU script is a bash script)",
}


def require_binary(name: str) -> str:
    """The path of `name` on PATH, or a LaunchError saying how to install it."""
    path = shutil.which(name)
    if path is None:
        hint = INSTALL_HINTS.get(name, f"install {name}")
        raise LaunchError(
            f"`{name}` was not found on PATH; {hint}. Or pass --dry_run to print the "
            "commands without running them"
        )
    return path
