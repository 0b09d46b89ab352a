"""GlobalBatchNorm2d: plain BatchNorm on one process, global-batch BatchNorm across gloo ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sge_repro.classification.sync_batchnorm import GlobalBatchNorm2d, convert_sync_batchnorm
from sge_repro.models import create_model

REPO = Path(__file__).resolve().parents[2]


def paired_layers(momentum, affine=True, track_running_stats=True, seed=0):
    torch.manual_seed(seed)
    plain = nn.BatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track_running_stats).double()
    if affine:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
            plain.bias.uniform_(-0.5, 0.5)
    synced = GlobalBatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track_running_stats).double()
    synced.load_state_dict(plain.state_dict())
    return plain, synced


def step(layer, x, upstream):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_one_process_equals_plain_batchnorm(momentum, affine):
    plain, synced = paired_layers(momentum, affine)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # several steps: running statistics and num_batches_tracked accumulate
        x = torch.randn(4, 5, 3, 3, generator=generator, dtype=torch.float64) * 2 + 1
        upstream = torch.randn(4, 5, 3, 3, generator=generator, dtype=torch.float64)
        out_plain, grad_plain = step(plain, x, upstream)
        out_synced, grad_synced = step(synced, x, upstream)
        assert torch.equal(out_plain, out_synced) and torch.equal(grad_plain, grad_synced)
    for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
        assert torch.equal(a, b), name
    if affine:
        assert torch.equal(plain.weight.grad, synced.weight.grad) and torch.equal(plain.bias.grad, synced.bias.grad)
    plain.eval(), synced.eval()
    x = torch.randn(2, 5, 3, 3, generator=generator, dtype=torch.float64)
    assert torch.equal(plain(x), synced(x))


def test_convert_keeps_state_dict_and_only_swaps_plain_batchnorm():
    model = create_model("sge_resnet18", num_classes=3, width=8, groups=4, seed=0)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    frozen = nn.SyncBatchNorm(4)  # a BatchNorm subclass: must be left as it is
    model.extra = frozen
    converted = convert_sync_batchnorm(model, "cpu")
    assert converted is model and model.extra is frozen
    assert isinstance(model.bn1, GlobalBatchNorm2d) and isinstance(model.layer1[0].bn2, GlobalBatchNorm2d)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    del model.extra
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    # The parameters are the same objects, so an optimizer built before or after sees them.
    assert model.bn1.weight.requires_grad and model.bn1.weight.grad is None


def test_sge_block_with_global_batchnorm_takes_the_unfused_path():
    # batchnorm_sge fuses only for exactly nn.BatchNorm2d; the subclass must go through bn() itself.
    model = convert_sync_batchnorm(create_model("sge_resnet18", num_classes=3, width=8, groups=4, seed=0), "cpu")
    bn = model.layer1[0].bn2
    calls = []

    def counting_forward(x):  # not a hook: hooks alone would already disable the fusion
        calls.append(1)
        return GlobalBatchNorm2d.forward(bn, x)

    bn.forward = counting_forward
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert calls == [1]


RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
from torch import nn
from sge_repro.classification.sync_batchnorm import GlobalBatchNorm2d
dist.init_process_group("gloo", init_method="env://")
rank = dist.get_rank()
inputs = torch.load(sys.argv[1], weights_only=True)
momentum = None if sys.argv[3] == "none" else float(sys.argv[3])
layer = GlobalBatchNorm2d(5, momentum=momentum).double()
layer.load_state_dict(inputs["state"])
outs, grads = [], []
for x, upstream in zip(inputs["x"], inputs["upstream"]):
    half = x.shape[0] // 2
    x = x[rank * half:(rank + 1) * half].clone().requires_grad_(True)
    out = layer(x)
    (out * upstream[rank * half:(rank + 1) * half]).sum().backward()
    outs.append(out.detach()), grads.append(x.grad)
torch.save({"out": outs, "grad": grads, "weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad,
            "state": layer.state_dict()}, sys.argv[2] + f".{rank}")
dist.destroy_process_group()
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(script: str, *args: str, timeout: float = 120) -> list[str]:
    port = free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "GLOO_SOCKET_IFNAME": "lo"}
        processes.append(subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, text=True))
    try:
        outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [process.returncode for process in processes] == [0, 0]
    return outputs


@pytest.mark.parametrize("momentum", [0.1, None])
def test_two_gloo_ranks_equal_one_process_on_the_global_batch(tmp_path, momentum):
    plain, _ = paired_layers(momentum)
    generator = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, 5, 3, 4, generator=generator, dtype=torch.float64) * 3 + 2 for _ in range(3)]
    upstreams = [torch.randn(6, 5, 3, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    torch.save({"x": xs, "upstream": upstreams, "state": plain.state_dict()}, tmp_path / "inputs.pt")
    run_two_ranks(RANK_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / "result"),
                  "none" if momentum is None else str(momentum))
    ranks = [torch.load(tmp_path / f"result.{rank}", weights_only=True) for rank in range(2)]

    for step_index, (x, upstream) in enumerate(zip(xs, upstreams)):
        out, grad = step(plain, x, upstream)
        # Each rank holds its half of the single-process output and input gradient.
        torch.testing.assert_close(torch.cat([r["out"][step_index] for r in ranks]), out, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.cat([r["grad"][step_index] for r in ranks]), grad, rtol=0, atol=1e-12)
    # Parameter gradients: each rank's share; DDP sums (then averages) them across ranks.
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], plain.weight.grad,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(ranks[0]["bias_grad"] + ranks[1]["bias_grad"], plain.bias.grad, rtol=0, atol=1e-12)
    for rank in ranks:
        for name, tensor in plain.state_dict().items():
            torch.testing.assert_close(rank["state"][name], tensor, rtol=0, atol=1e-12, msg=name)
    assert int(ranks[0]["state"]["num_batches_tracked"]) == 3
