"""`parti-jax train` as 2 processes x 4 CPU devices (gloo collectives on 127.0.0.1):
the same losses as 1 process x 8 devices, with a local or a gs:// work dir (the GCS
emulator, tests/gcs_testing.py); processes on the tensor axis read the same data."""

import pytest

from parti_jax import storage
from tests.train import cli_testing as ct

STEPS = (
    "train/LoopConfig.num_steps=6",
    "train/LoopConfig.log_every=1",
    "train/LoopConfig.log_data_hash=True",
)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gs"])
def test_two_processes_match_one_process(where, tmp_path, request):
    one = tmp_path / "one"
    ct.run(ct.train_args(one, *STEPS))
    expected = ct.losses(one / "metrics.jsonl")
    assert sorted(expected) == list(range(1, 7))

    # Data parallel over both processes: each reads its own half of the batch.
    two = str(tmp_path / "two") if where == "local" else request.getfixturevalue("gcs").url("two")
    ct.run_processes(two, list(STEPS))
    got = ct.losses(storage.join(two, "metrics.jsonl"))
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    h0 = ct.read_jsonl(storage.join(two, "data_hash.process_0.jsonl"))
    h1 = ct.read_jsonl(storage.join(two, "data_hash.process_1.jsonl"))
    assert [h["shard"] for h in h0] == [0] * 6 and [h["shard"] for h in h1] == [1] * 6
    assert all(a["data_hash"] != b["data_hash"] for a, b in zip(h0, h1))
    positions = storage.listdir(storage.join(two, "checkpoints", "6", "data"))
    assert [n for n in positions if n.startswith("shard_")] == [
        "shard_0_of_2.json",
        "shard_1_of_2.json",
    ]
    assert ct.committed_steps(two) == [6]


@pytest.mark.slow
def test_processes_along_tensor_read_identical_data(tmp_path):
    """The two processes along 'tensor' (one DCN granule each): both read shard 0 of 1."""
    tensor = tmp_path / "tensor"
    ct.run_processes(
        tensor,
        [*STEPS, "MeshConfig.data=4", "MeshConfig.dcn_tensor=2", "MeshConfig.rules='fsdp_tp'"],
    )
    t0 = ct.read_jsonl(tensor / "data_hash.process_0.jsonl")
    t1 = ct.read_jsonl(tensor / "data_hash.process_1.jsonl")
    assert len(t0) == 6 and t0 == t1
    assert all(h["shard"] == 0 for h in t0)
    assert sorted(p.name for p in (tensor / "checkpoints" / "6" / "data").glob("shard_*")) == [
        "shard_0_of_1.json"  # written once, by the first process of the shard
    ]
    got = ct.losses(tensor / "metrics.jsonl")
    assert sorted(got) == list(range(1, 7)) and got[6] < got[1]


def test_distributed_settings_from_environment(monkeypatch):
    from parti_jax.train import distributed

    for name in (
        "PARTI_JAX_COORDINATOR", "PARTI_JAX_NUM_PROCESSES", "PARTI_JAX_PROCESS_ID",
        "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
        "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert distributed.distributed_settings() is None  # a single process: no initialize()
    monkeypatch.setenv("PARTI_JAX_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("PARTI_JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("PARTI_JAX_PROCESS_ID", "3")
    assert distributed.distributed_settings() == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
    }
    assert distributed.distributed_settings(process_id=1)["process_id"] == 1
    monkeypatch.setenv("PARTI_JAX_NUM_PROCESSES", "1")
    assert distributed.distributed_settings() is None
    monkeypatch.delenv("PARTI_JAX_PROCESS_ID")
    monkeypatch.setenv("PARTI_JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"missing: process_id \(PARTI_JAX_PROCESS_ID\)"):
        distributed.distributed_settings()
    for name in ("PARTI_JAX_COORDINATOR", "PARTI_JAX_NUM_PROCESSES"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.distributed_settings() == {}  # jax's own SLURM detection fills in
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.distributed_settings() is None
