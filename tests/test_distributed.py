"""Data parallel with accelerate (flowkern.train.distributed): 2 CPU processes (gloo) of batch B equal one process
of batch 2B; skips agree across processes; only the main process writes checkpoints. One `accelerate launch`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from flowkern.train import Trainer, list_checkpoints, load_checkpoint
from tests._ddp_worker import BATCH, UPDATES, build, reward

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "tests" / "_ddp_worker.py"), str(out)]  # fmt: skip
    # HF_HOME: no user accelerate config file can change the launch; one thread per process on a 2-core runner
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(out / "hf"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def _load(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}-rank{rank}.pt", weights_only=False)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["dam", "vggflow"])
def test_two_processes_equal_one_with_doubled_batch(launched, name):
    ranks = [_load(launched, name, r) for r in (0, 1)]
    assert ranks[0]["num_processes"] == 2
    for key in ("model", "value_net"):  # every process holds the same weights, bitwise
        if ranks[0][key] is not None:
            for k, v in ranks[0][key].items():
                assert torch.equal(v, ranks[1][key][k]), f"{key}/{k} differs between processes"
    assert not torch.equal(ranks[0]["process_generator"], ranks[1]["process_generator"])  # per-process streams

    single = build(name, 2 * BATCH)
    single.train(UPDATES)
    dist = ranks[0]
    for n, p in single.model.residual.named_parameters():
        torch.testing.assert_close(dist["model"][n], p.detach(), rtol=1e-4, atol=1e-5)
    if name == "vggflow":
        for k, v in single.method.value_net.state_dict().items():
            torch.testing.assert_close(dist["value_net"][k], v, rtol=1e-4, atol=1e-5)
        assert dist["tau"] == pytest.approx(single.method.tau, rel=1e-5)  # (M9) quantile over both processes
        assert dist["tau"] != 1.0
    moved = sum(float((p.detach() - build(name, 2 * BATCH).model.residual.get_parameter(n).detach()).abs().sum())
                for n, p in single.model.residual.named_parameters())  # fmt: skip
    assert moved > 1e-3  # the comparison is not between untrained models
    for a, b in zip(dist["history"], single.history):
        for key in ("loss", "reward_mean", "grad_norm_theta"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["skipped"] == b["skipped"] == 0.0


def test_non_finite_on_one_process_skips_everywhere(launched):
    ranks = [_load(launched, "poisoned", r) for r in (0, 1)]
    for rank in ranks:
        assert rank["skipped"] == [(1, "non-finite loss (process 1)")]
        assert [h["skipped"] for h in rank["history"]] == [0.0, 1.0, 0.0]
    for k, v in ranks[0]["model"].items():
        assert torch.equal(v, ranks[1]["model"][k])


def test_only_main_process_writes_checkpoints(launched):
    run = launched / "dam"
    assert sorted(os.listdir(run)) == ["step-00000002", "step-00000003"]  # every 2 updates + the end, no temp dirs
    resumed = build("dam", BATCH)
    with pytest.warns(UserWarning, match="written by 2 process"):
        path = load_checkpoint(resumed, run)
    assert path == list_checkpoints(run)[-1]
    rank0 = _load(launched, "dam", 0)
    for n, p in resumed.model.residual.named_parameters():
        assert torch.equal(p.detach(), rank0["model"][n])
    assert resumed.step == UPDATES and len(resumed.history) == UPDATES


# ---------------------------------------------------------------- in-process: one process, argument checks
@pytest.fixture
def single_accelerator():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    yield accelerate.Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # the next test may build another Accelerator


def test_single_process_accelerator_is_bitwise_plain(single_accelerator):
    plain = build("vggflow", BATCH)
    wrapped = build("vggflow", BATCH, accelerator=single_accelerator)
    assert wrapped.device == torch.device(single_accelerator.device)
    plain.train(2)
    wrapped.train(2)
    for (n, a), (_, b) in zip(plain.model.residual.named_parameters(), wrapped.model.residual.named_parameters()):
        assert torch.equal(a, b), n
    assert plain.method.tau == wrapped.method.tau


def _fake(**kw):
    base = dict(backward=None, reduce=None, wait_for_everyone=None, autocast=None, device="cpu", process_index=0,
                num_processes=1, is_main_process=True, distributed_type="DistributedType.NO", scaler=None)  # fmt: skip
    return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("accelerator,error,match", [
    (object(), TypeError, "accelerate.Accelerator"),
    (_fake(scaler=object()), ValueError, "fp16"),
    (_fake(distributed_type="DistributedType.DEEPSPEED"), ValueError, "DEEPSPEED"),
])  # fmt: skip
def test_unsupported_accelerators_are_refused(accelerator, error, match):
    from flowkern.methods import AdjointMatching, flow_callables
    from flowkern.models.toy import GaussianMixture, make_toy_model

    model = make_toy_model(GaussianMixture.ring(4), hidden=8, depth=1)
    v, vb = flow_callables(model)
    with pytest.raises(error, match=match):
        Trainer(model, reward, AdjointMatching(v, vb, reward, beta=1.0), sample_shape=(2,), accelerator=accelerator)
