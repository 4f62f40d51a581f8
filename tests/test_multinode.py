"""``trainer=multinode`` on two "nodes" of one machine (CPU, gloo): started by torchrun (two agents, ``--nnodes 2
--node-rank {0,1}``) or by SLURM's environment variables (the two tasks ``srun`` would start), the per-image results
equal one process's: every purified chunk bit for bit, and the certification records."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, run_script

# Launcher variables of an enclosing job must not leak into the processes the test starts.
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE",
                      "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NUM_NODES", "GPUS_PER_NODE")
CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", "callbacks.rich_progress_bar=null"]
# The shipped 28×28 EBM on the 8×8 digits upsampled to 28×28 (1,257 train images: 6 chunks of 250), 2 Langevin steps.
PURIFICATION = ["experiment=pureebm_badnets_digits", "data.base.source=sklearn8x8", "data.base.img_size=28",
                "callbacks.purification.steps=2", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
# The smoothed CNN on 16×16 digits, 3 epochs (test accuracy ≈ 0.16: predictions and margins vary across images).
CERTIFICATION = ["experiment=smoothed_cnn_digits", "data.img_size=16", "trainer.max_epochs=3",
                 "trainer.check_val_every_n_epoch=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "TORCHELASTIC_"))
           and key not in LAUNCHER_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"}


def node_command(launcher: str, node: int, port: int, script: str, overrides: list[str]) -> tuple[list, dict]:
    """The command and environment of one of the two nodes (one process each)."""
    env = clean_env()
    if launcher == "torchrun":  # ``python -m torch.distributed.run`` is the ``torchrun`` console script
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), script,
                *overrides], env
    # What srun sets in task `node` of `srun --nodes 2 --ntasks-per-node 1`; a job name other than bash/interactive,
    # else Lightning ignores SLURM (lightning/fabric/plugins/environments/slurm.py).
    env.update(SLURM_NTASKS="2", SLURM_PROCID=str(node), SLURM_LOCALID="0", SLURM_NODEID=str(node),
               SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NAME="lit-robust-test", SLURM_JOB_ID="4242",
               SLURM_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return [sys.executable, script, *overrides], env


def run_two_nodes(launcher: str, script: str, *overrides: str, timeout: int = 300) -> None:
    port = free_port()
    commands = [node_command(launcher, node, port, script, [*overrides, "trainer=multinode", *CPU])
                for node in (0, 1)]
    nodes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for command, env in commands]
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, output in enumerate(outputs):
        assert nodes[node].returncode == 0, f"{launcher} node {node} failed:\n{output[-6000:]}"
    assert "Starting with 2 processes" in outputs[0], outputs[0][-3000:]


@pytest.fixture(scope="module")
def single_purification(tmp_path_factory):
    root = tmp_path_factory.mktemp("purification_1")
    run_script("train.py", *PURIFICATION, "trainer=cpu", *CPU, f"hydra.run.dir={root / 'run'}",
               f"data.cache_dir={root / 'poisons'}", f"callbacks.purification.cache_dir={root / 'purified'}")
    return root / "purified"


def chunks(cache_dir) -> dict:
    """{chunk file name: bytes} of the one cache key under ``cache_dir``."""
    keys = list(cache_dir.iterdir())
    assert len(keys) == 1, keys
    return {path.name: path.read_bytes() for path in sorted(keys[0].glob("chunk_*.pt"))}


@pytest.mark.slow  # ≈ 70 s per launcher on 2 cores: over the CI suite's budget; results in docs/results.md
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_nodes_purify_the_single_process_train_set_bit_for_bit(launcher, single_purification, tmp_path):
    run_two_nodes(launcher, "train.py", *PURIFICATION, f"hydra.run.dir={tmp_path / 'run'}",
                  f"data.cache_dir={tmp_path / 'poisons'}", f"callbacks.purification.cache_dir={tmp_path / 'purified'}")
    single, double = chunks(single_purification), chunks(tmp_path / "purified")
    assert list(single) == [f"chunk_{i:05d}.pt" for i in range(6)]  # 1,257 images in chunks of 250: all present
    assert list(double) == list(single)
    assert all(double[name] == single[name] for name in single)  # the saved tensors, byte for byte
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["purify/mean_l2_change"] > 0 and "test/acc" in metrics


@pytest.fixture(scope="module")
def single_certification(tmp_path_factory):
    single = tmp_path_factory.mktemp("certification_1")
    run_script("train.py", *CERTIFICATION, "trainer=cpu", *CPU, f"hydra.run.dir={single}")
    return single


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_nodes_certify_the_single_process_records(launcher, single_certification, tmp_path):
    """Trained on one process; the checkpoint certified by ``evaluate.py`` on two nodes (the same weights: DDP
    training itself draws other batches than one process)."""
    single = single_certification
    run_two_nodes(launcher, "evaluate.py", *CERTIFICATION, f"ckpt_path={single / 'checkpoints' / 'best.ckpt'}",
                  f"hydra.run.dir={tmp_path / 'nodes'}")
    records = [json.loads((run / "certification" / "test_records.json").read_text())
               for run in (single, tmp_path / "nodes")]
    assert records[0] == records[1]
    model = records[0]["modes"]["model"]
    assert len(model) == 360 and len({r["prediction"] for r in model}) > 1 and len({r["margin"] for r in model}) > 1


def test_nodes_and_devices_come_from_torchrun_unless_given(monkeypatch):
    from omegaconf import OmegaConf
    from test_configs import compose_train

    for name in ("NUM_NODES", "GPUS_PER_NODE", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")   # what torchrun --nnodes 2 --nproc-per-node 4 sets
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    trainer = OmegaConf.to_container(compose_train("trainer=multinode").trainer, resolve=True)
    assert (trainer["num_nodes"], trainer["devices"]) == (2, 4)
    monkeypatch.setenv("NUM_NODES", "3")
    assert OmegaConf.to_container(compose_train("trainer=multinode").trainer, resolve=True)["num_nodes"] == 3
