"""A distributed run whose peer dies or hangs mid-training: the surviving rank ends with a one-line
DistributedError naming its rank and what happened (gloo, 2 CPU processes).

The two ranks are plain processes with torchrun's environment variables, not a torchrun launch:
torchrun would kill the survivor as soon as the other process exits, before it can report anything.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _launch(mode: str, out: Path, timeout: float) -> list[subprocess.CompletedProcess]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__)), mode, str(out), str(timeout)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:  # the survivor first: a hanging peer is killed once the survivor has reported
        try:
            stdout, stderr = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        if p is procs[0] and mode == "hangs":
            procs[1].kill()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


@pytest.mark.parametrize("mode, expected", [
    ("dies", "DistributedError: rank 0 of 2: another process of the run stopped during training"),
    ("hangs", "DistributedError: rank 0 of 2: a collective waited more than --dist-timeout 3 s"),
])
def test_a_failure_during_the_run_ends_the_survivor_with_one_line(tmp_path: Path, mode: str, expected: str) -> None:
    survivor, peer = _launch(mode, tmp_path, 3)
    assert peer.returncode == (3 if mode == "dies" else -9), peer.stderr[-2000:]
    assert survivor.returncode == 2, survivor.stderr[-3000:]
    lines = [line for line in survivor.stderr.splitlines() if "Error" in line]
    assert any(line.startswith(expected) for line in lines), survivor.stderr[-3000:]
    assert "Traceback" not in survivor.stderr and "--resume" in survivor.stderr


@pytest.mark.parametrize("timeout", [0.0, -5.0, float("inf"), float("nan")])
def test_dist_timeout_must_be_positive_and_finite(timeout: float) -> None:
    import lorakit
    from lorakit.train.distributed import DistributedTrainer
    from lorakit.train.config import TrainConfig
    from tests.tiny_models import ToyTask

    task = ToyTask()
    with pytest.raises(lorakit.ConfigError, match="--dist-timeout must be a number of seconds > 0"):
        DistributedTrainer(task, lorakit.LoraConfig(r=2, target_modules=task.default_targets), TrainConfig(), "unused",
                           timeout=timeout)


def _worker(mode: str, out: Path, timeout: float) -> None:
    import time

    import lorakit
    from lorakit.errors import LorakitError
    from lorakit.train import distributed as D
    from lorakit.train.config import TrainConfig
    from tests.tiny_models import ToyTask

    rank = int(os.environ["RANK"])
    if rank == 1:
        calls = [0]
        real_loss = ToyTask.loss

        def loss(self, model, batch):
            calls[0] += 1
            if calls[0] == 3:  # mid-run, after two steps that all ranks took together
                if mode == "hangs":
                    time.sleep(60)  # killed by the test once rank 0 has given up
                os._exit(3)
            return real_loss(self, model, batch)

        ToyTask.loss = loss  # type: ignore[method-assign]
    task = ToyTask()
    try:
        trainer = D.DistributedTrainer(task, lorakit.LoraConfig(r=4, alpha=8, target_modules=task.default_targets),
                                       TrainConfig(max_steps=6, lr=1e-2, batch_size=2), out / "run", strategy="ddp",
                                       timeout=timeout, log=io.StringIO())
        trainer.fit()
    except LorakitError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        D.shutdown()
        sys.exit(2)
    D.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]))
