"""Two CPU processes (gloo) give the same samples and metrics as one; data-parallel training keeps
every process's student identical. Launched with accelerate (and torchrun) like a GPU user would."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_faults import comparable

SUITE = """
name = "dist"
prompts = "shapes-eval"
samples = 13
batch_size = 4
grid = 4
metrics = ["fid", "clip_score", "accuracy"]
[[methods]]
name = "teacher"
label = "teacher"
nfe = [2, 4]
settings = {{ solver = "dpmsolver++" }}
[[methods]]
name = "pretrained"
label = "turbo-like"
steps = [1, 2]
settings = {{ kind = "turbo", path = "{ckpt}", max_steps = 2 }}
"""


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("FLASHBENCH_FAULT", None)
    return env


def launch(launcher, *args, nproc=2):
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bench"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "bench"]
    return subprocess.run(cmd + list(map(str, args)), capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=900)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import tiny_backbone

    d = tmp_path_factory.mktemp("dist")
    # a "published" checkpoint: the shipped teacher's UNet saved as a diffusers dir (no training involved)
    from bench.shapes.teacher import ShapesBackbone

    ShapesBackbone.load().new_net().save_pretrained(d / "ckpt", safe_serialization=True)
    (d / "suite.toml").write_text(SUITE.format(ckpt=d / "ckpt"))
    r = subprocess.run([sys.executable, "-m", "bench", "run", str(d / "suite.toml"), "--out", str(d / "one"),
                        "--cache", str(d / "cache"), "--no-progress"], capture_output=True, text=True, env=_env(),
                       cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    del tiny_backbone
    return d


@pytest.mark.parametrize("launcher", [pytest.param("accelerate", marks=pytest.mark.slow), "torchrun"])
def test_two_processes_equal_one(setup, launcher):
    d = setup
    out = d / f"two-{launcher}"
    r = launch(launcher, "run", d / "suite.toml", "--out", out, "--cache", d / "cache", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["processes"] == 2
    one, two = comparable(d / "one"), comparable(out)
    assert one == two  # identical samples -> identical metrics, bit for bit
    assert (out / "grids/teacher_nfe2.png").read_bytes() == (d / "one/grids/teacher_nfe2.png").read_bytes()


TRAIN = """
import hashlib, os, sys, tempfile, torch
sys.path.insert(0, {root!r})
from bench.dist import Dist
from methods import base
from bench.shapes.teacher import ShapesBackbone
d = Dist()
bb = ShapesBackbone.load()
cls = base.get("imagine-flash")
cfg = cls.make_config({{"student_updates": 3, "batch_size": 2}})
m = cls(bb, cfg, base.Context({cache!r}, progress=False, rank=d.rank, world=d.world))
m.prepare(1)
w = torch.cat([p.detach().flatten() for p in m.student_net(1).parameters()])
digests = [None] * d.world
torch.distributed.all_gather_object(digests, hashlib.sha256(w.numpy().tobytes()).hexdigest())
moved = not torch.equal(w, torch.cat([p.flatten() for p in bb.new_net().parameters()]))
os.write(1, f"RESULT {{d.rank}} {{len(set(digests))}} {{moved}} {{m.cache_stem(1)}}\\n".encode())  # one write: ranks share a pipe
"""


def test_data_parallel_training_keeps_processes_identical(setup):
    code = TRAIN.format(root=str(ROOT), cache=str(setup / "ddp-cache"))
    (setup / "train_ddp.py").write_text(code)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        str(setup / "train_ddp.py")], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    assert len(lines) == 2
    for line in lines:
        _, rank, distinct, moved, stem = line.split()
        assert distinct == "1" and moved == "True"  # trained, and the same weights on both processes
    assert len(list((setup / "ddp-cache").glob("*.safetensors"))) == 1  # one writer


def test_collectives_take_tensors_on_the_backends_device():
    """NCCL takes CUDA tensors only; gloo (and a mixed backend's CPU part) CPU tensors."""
    import torch

    from bench.dist import collective_device

    gpu = torch.device("cuda", 3)
    assert collective_device("nccl", gpu) == gpu
    assert collective_device("gloo", torch.device("cpu")) == torch.device("cpu")
    assert collective_device("cuda:nccl,cpu:gloo", gpu) == torch.device("cpu")


def test_several_cuda_processes_each_sample_on_their_own_gpu(monkeypatch):
    from bench.dist import Dist

    d = Dist("cuda")
    assert d.run_device == "cuda"  # one process: as asked
    d.world, d.local_rank = 8, 5
    assert d.run_device == "cuda:5"
    d.requested = "cuda:1"
    assert d.run_device == "cuda:1"  # an explicit device is the user's


CHECKED = """
import os, sys, torch
sys.path.insert(0, {root!r})
from bench.dist import Dist, collective_device
d = Dist()
seen = []
def checking(fn):
    def wrapper(*a, **k):
        tensors = [x for x in a if torch.is_tensor(x)] + [x for x in a if isinstance(x, list) for x in x if torch.is_tensor(x)]
        for t in tensors:
            seen.append(t.device)
            assert t.device == d.device, (fn.__name__, t.device, d.device)
        return fn(*a, **k)
    return wrapper
torch.distributed.all_gather = checking(torch.distributed.all_gather)
torch.distributed.all_reduce = checking(torch.distributed.all_reduce)
assert d.device == collective_device(torch.distributed.get_backend(), torch.device("cpu"))
x = torch.arange(3 * (d.rank + 1), dtype=torch.float32).reshape(-1, 3)  # shards of 1 and 2 rows
os.write(1, f"RESULT {{d.rank}} {{d.gather(x, 3).tolist()}} {{d.sum([1.0, d.rank])}} {{len(seen)}}\\n".encode())  # one write
torch.distributed.destroy_process_group()
"""


def test_collectives_run_on_the_collective_device_in_rank_order(tmp_path):
    """Two processes (torchrun, gloo) under a wrapper that checks every tensor handed to a collective is on
    ``Dist.device``, the backend's device: unequal shards gathered in rank order, sums over processes."""
    (tmp_path / "checked.py").write_text(CHECKED.format(root=str(ROOT)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        str(tmp_path / "checked.py")], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    assert [line.split(" ", 2)[2] for line in lines] == ["[[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] [2.0, 1.0] 4"] * 2
