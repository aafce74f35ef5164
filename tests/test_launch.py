"""The launch scripts' dry runs print exactly the commands they would run."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(script, *args):
    result = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, PATH=os.environ["PATH"]))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_tpu_dry_run_creates_installs_trains_and_deletes():
    lines = dry_run("tpu.sh", "--dry-run", "--name", "pod", "--zone", "europe-west4-a",
                    "--accelerator", "v4-32", "--spot", "--repo", "https://example.org/ddpm.git",
                    "--workdir", "gs://bucket/run", "--delete", "--", "--config.batch_size=512")
    assert lines[0] == ("gcloud compute tpus tpu-vm create pod --zone=europe-west4-a "
                        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot ")
    assert lines[1].startswith("gcloud compute tpus tpu-vm ssh pod --zone=europe-west4-a "
                               "--worker=all --command=")
    assert "git\\ clone\\ https://example.org/ddpm.git" in lines[1]
    assert "jax\\[tpu\\]" in lines[1]
    assert lines[2] == (
        "gcloud compute tpus tpu-vm ssh pod --zone=europe-west4-a --worker=all --command="
        "cd\\ ddpm-jax\\ \\&\\&\\ .\\ .venv/bin/activate\\ \\&\\&\\ python\\ -m\\ ddpm_jax.main"
        "\\ --config=configs/celeba.py\\ --workdir=gs://bucket/run\\ --config.batch_size=512 ")
    assert lines[3] == "gcloud compute tpus tpu-vm delete pod --zone=europe-west4-a --quiet "
    assert len(lines) == 4


def test_tpu_requires_a_gcs_workdir():
    result = subprocess.run(["bash", "launch/tpu.sh", "--dry-run", "--workdir", "/local"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "gs://" in result.stderr


def test_slurm_dry_run_prints_the_batch_script():
    lines = dry_run("slurm.sh", "--dry-run", "--nodes", "3", "--gpus-per-node", "4",
                    "--partition", "gpu", "--workdir", "/shared/run", "--",
                    "--config.model.dtype=bfloat16")
    assert "#SBATCH --nodes=3" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert "#SBATCH --gpus-per-node=4" in lines and "#SBATCH --partition=gpu" in lines
    assert "#SBATCH --signal=TERM@300" in lines
    assert f"cd {ROOT}" in lines
    assert lines[-2] == (
        "srun --kill-on-bad-exit=1 bash -c 'CUDA_VISIBLE_DEVICES=$SLURM_LOCALID python -m "
        "ddpm_jax.main --config=configs/celeba.py --workdir=/shared/run "
        "--config.model.dtype=bfloat16'")
    assert lines[-1] == "sbatch <the script above>"


def test_local_dry_run_starts_one_process_per_index(monkeypatch):
    # other XLA flags are kept, the device count is the script's
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_dump_to=/d")
    lines = dry_run("local.sh", "--dry-run", "2", "3", "--", "--config=configs/quickstart.py",
                    "--workdir=/tmp/x")
    assert len(lines) == 2
    for line, index in zip(lines, (1, 0), strict=True):
        assert ("XLA_FLAGS=--xla_dump_to=/d\\ --xla_force_host_platform_device_count=3" in line
                and "count=4" not in line), line
        assert "--num_processes=2" in line and f"--process_id={index}" in line
        assert line.rstrip().endswith("--config=configs/quickstart.py --workdir=/tmp/x")
