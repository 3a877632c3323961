"""`parti-jax train` killed with SIGKILL resumes with the losses of an uninterrupted run
(metrics.jsonl holding each step once); bad command-line input fails with one line
naming the problem."""

import subprocess

import pytest

from tests.train import cli_testing as ct

COMMON = (
    "train/LoopConfig.log_every=1",
    "train/LoopConfig.checkpoint_every=4",
    "train/LoopConfig.keep_checkpoints=3",
)


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    ct.run(ct.train_args(reference, "train/LoopConfig.num_steps=60", *COMMON))
    expected = ct.losses(reference / "metrics.jsonl")
    assert sorted(expected) == list(range(1, 61))

    killed = tmp_path / "killed"
    args = ct.train_args(killed, "train/LoopConfig.num_steps=100000", *COMMON)
    resume_from = ct.kill_after_checkpoint(args, killed, step=8)
    assert resume_from < 56, resume_from
    before = ct.read_jsonl(killed / "metrics.jsonl")
    for m in before:  # the killed run agrees with the reference up to its death
        assert m["loss"] == expected[m["step"]]

    ct.run(ct.train_args(killed, f"train/LoopConfig.num_steps={resume_from + 4}", *COMMON))
    # The killed run's lines past the checkpoint are logged again by the resumed run,
    # not twice: each step once, with the reference's losses.
    after = ct.read_jsonl(killed / "metrics.jsonl")
    assert [m["step"] for m in after] == list(range(1, resume_from + 5))
    assert [m["loss"] for m in after] == [expected[m["step"]] for m in after]


def test_cli_bad_input_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run(
        ct.train_args(blocker / "run"), env=ct.env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "is not writable" in proc.stderr and "Traceback" not in proc.stderr
    # 16 heads cannot split over tensor=3: fails before compiling, naming both numbers.
    bindings = (
        "MeshConfig.tensor=3",
        "MeshConfig.rules='fsdp_tp'",
        "ModelConfig.num_heads=16",
        "train.batch_size=6",
    )
    proc = subprocess.run(
        ct.train_args(tmp_path / "run", *bindings),
        env=ct.env(devices=6),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "num_heads=16 is not divisible by tensor=3" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
