"""Small training utilities shared by every trainer: the optimizer step, EMA, checkpoints, the resumable
update loop, the student cache, divergence checks."""

from __future__ import annotations

import collections
import copy
import functools
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from core import faults, io


class DivergenceError(RuntimeError):
    """A loss or a sample became NaN/Inf; carries the step where it happened."""

    def __init__(self, what: str, step: int):
        super().__init__(f"{what} is not finite at step {step}")
        self.what, self.step = what, step


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(value).all():
        raise DivergenceError(what, step)


class PassCounter(nn.Module):
    """Wraps a network used in training and counts its passes per sample: a forward call on a batch of B
    counts B forward passes; when a gradient flows back through that call's output, B backward passes.

    Training compute is therefore counted, never computed from a formula (`TrainCompute`). With
    ``record_timesteps``, the timesteps of the passes made with gradient enabled (the inputs the network
    learns from) are counted too, per value: ``timesteps`` {t: samples}.
    """

    def __init__(self, net: nn.Module, record_timesteps: bool = False):
        super().__init__()
        self.net = net
        self.forward_passes = 0
        self.backward_passes = 0
        self.timesteps: collections.Counter | None = collections.Counter() if record_timesteps else None

    def forward(self, x, *args, **kwargs):
        n = x.shape[0]
        self.forward_passes += n
        if self.timesteps is not None and torch.is_grad_enabled() and args:
            t = torch.as_tensor(args[0]).detach().flatten().cpu()
            self.timesteps.update(_timestep_key(v) for v in t.expand(n).tolist())
        out = self.net(x, *args, **kwargs)
        self.watch(out.sample if hasattr(out, "sample") else out, n)
        return out

    def watch(self, out: torch.Tensor, n: int) -> None:
        """Count `n` backward passes when a gradient reaches `out`."""
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(functools.partial(self._backward, n))

    def _backward(self, n: int, grad):
        self.backward_passes += n


def _timestep_key(t: float) -> str:
    """A timestep as a JSON key: an integer where it is one (VP), else rounded (flow)."""
    return str(int(t)) if float(t).is_integer() else f"{t:.4g}"


class TrainCompute:
    """What one training spends, as counted: the PassCounters by role (teacher, student, ema_target, fake_score,
    discriminator), the seconds spent in its updates, and the timesteps of the student's gradient passes
    (role ``student``: the inputs it learns from). All of it survives a checkpoint (``state``)."""

    def __init__(self):
        self.counters: dict[str, list] = {}
        self.seconds = 0.0  # wall seconds inside the updates, summed over every session of the training

    def count(self, net: nn.Module, role: str) -> PassCounter:
        counter = PassCounter(net, record_timesteps=role == "student")
        self.add(counter, role)
        return counter

    def add(self, counter, role: str) -> None:
        """Count an object with ``forward_passes`` / ``backward_passes`` (e.g. a discriminator) under `role`."""
        self.counters.setdefault(role, []).append(counter)

    def passes(self) -> dict[str, dict[str, int]]:
        """{role: {"forward": passes, "backward": passes}} summed over the role's networks (per sample)."""
        return {role: {"forward": sum(c.forward_passes for c in cs), "backward": sum(c.backward_passes for c in cs)}
                for role, cs in self.counters.items()}

    def student_timesteps(self) -> dict[str, int]:
        """{t: samples} of the student's gradient passes, by increasing t."""
        total = collections.Counter()
        for c in self.counters.get("student", []):
            total.update(c.timesteps or {})
        return dict(sorted(total.items(), key=lambda kv: float(kv[0])))

    def state(self) -> dict:
        return {"seconds": self.seconds,
                "counters": {role: [[c.forward_passes, c.backward_passes, dict(getattr(c, "timesteps", None) or {})]
                                    for c in cs] for role, cs in self.counters.items()}}

    def load_state(self, state: dict) -> None:
        self.seconds = state.get("seconds", 0.0)
        for role, values in state.get("counters", {}).items():
            for c, (f, b, ts) in zip(self.counters.get(role, []), values):
                c.forward_passes, c.backward_passes = f, b
                if getattr(c, "timesteps", None) is not None:
                    c.timesteps = collections.Counter(ts)


def add_passes(a: dict | None, b: dict | None) -> dict:
    """The sum of two `TrainCompute.passes()` dicts (a training that continues another)."""
    out = {role: dict(v) for role, v in (a or {}).items()}
    for role, v in (b or {}).items():
        o = out.setdefault(role, {"forward": 0, "backward": 0})
        o["forward"] += v["forward"]
        o["backward"] += v["backward"]
    return out


class EMA:
    """Exponential moving average of a module's parameters (buffers copied)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int | None = None) -> None:
        # warm-up as in common practice: decay ramps from 0 towards self.decay
        d = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params=None, grad_clip: float | None = None) -> None:
    """One update: zero the gradients, backpropagate `loss`, clip the gradient norm of `params` to
    `grad_clip` (when given), step. The one place every trainer's update is written."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def balanced_step(opt: torch.optim.Optimizer, main: torch.Tensor, extra: torch.Tensor, params,
                  grad_clip: float | None = None, ratio: float | None = None) -> dict[str, float]:
    """One update along ∇main + s·∇extra with s = min(1, ratio·‖∇main‖ / ‖∇extra‖) (s = 1 without a ratio).

    The two gradients come from two backward passes (the second costs one more backward pass of every network
    both losses pass through, which the pass counters see); then, as in `optimizer_step`, the clip and the step.
    Returns the two norms, their cosine and s: ``{"grad_main", "grad_extra", "grad_cos", "grad_scale"}``."""
    params = [p for p in params if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    main.backward(retain_graph=True)
    g_main = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    opt.zero_grad(set_to_none=True)
    extra.backward()
    g_extra = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    n_main = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g_main])).item()
    n_extra = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g_extra])).item()
    dot = sum(torch.sum(a * b).item() for a, b in zip(g_main, g_extra))
    scale = 1.0 if ratio is None or n_extra == 0 else min(1.0, ratio * n_main / n_extra)
    for p, a, b in zip(params, g_main, g_extra):
        p.grad = a + scale * b
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    cos = dot / (n_main * n_extra) if n_main > 0 and n_extra > 0 else 0.0
    return {"grad_main": n_main, "grad_extra": n_extra, "grad_cos": cos, "grad_scale": scale}


def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {f"{prefix}.param_groups": json.dumps(sd["param_groups"])}


def _unflatten_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, k = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta[f"{prefix}.param_groups"])})


def save_checkpoint(path: Path, step: int, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], extra: dict | None = None) -> str:
    """One safetensors file with every module and optimizer state; written atomically."""
    tensors, meta = {}, {"step": str(step), "extra": json.dumps(extra or {})}
    for name, m in modules.items():
        tensors.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    for name, opt in optimizers.items():
        t, m = _flatten_optimizer(opt, f"opt:{name}")
        tensors.update(t)
        meta.update(m)
    return io.save_tensors(path, tensors, meta)


def load_checkpoint(path: Path, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, dict]:
    """Restore modules and optimizers in place; returns (step, extra)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    for name, m in modules.items():
        pre = name + "."
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    for name, opt in optimizers.items():
        _unflatten_optimizer(opt, f"opt:{name}", tensors, meta)
    return int(meta["step"]), json.loads(meta.get("extra", "{}"))


# --- the loop every distillation method shares ----------------------------------------------------


def run_updates(update, total: int, ckpt: Path, modules: dict[str, nn.Module],
                optimizers: dict[str, torch.optim.Optimizer], desc: str, progress: bool = True,
                ckpt_every: int | None = None, log_every: int = 10, compute: TrainCompute | None = None) -> dict:
    """Call ``update(step) -> {loss name: float}`` for steps [start, total); resumable from ``ckpt``.

    Checkpoints (modules + optimizers + loss log + what `compute` counted) are written atomically every
    ``ckpt_every`` updates and at the end; a killed training resumes at its last checkpoint with the counts
    it had there, and a finished one can be continued to a larger `total` from its final checkpoint
    (``cached_student``'s continuation). NaN/Inf in any loss raises DivergenceError with the step. Returns
    the loss log: per loss, means over windows of ``log_every`` updates.
    """
    from tqdm import tqdm

    ckpt_every = ckpt_every or max(1, min(100, total // 10))
    log_every = math.gcd(log_every, ckpt_every)  # loss windows never straddle a checkpoint
    start, log, window = 0, {}, {}  # window: the losses of the log window in progress
    if ckpt.exists():
        try:
            start, extra = load_checkpoint(ckpt, modules, optimizers)
            log, window = extra.get("log", {}), extra.get("window", {})
            if compute is not None:
                compute.load_state(extra.get("passes", {}))
        except Exception as e:  # a torn or corrupt checkpoint: never used, training restarts
            import warnings

            warnings.warn(f"ignoring unreadable checkpoint {ckpt.name} ({type(e).__name__}); training from the start",
                          stacklevel=2)
            ckpt.unlink()
            start, log, window = 0, {}, {}
    handles = _sync_gradients(modules)
    rank0 = not _distributed() or torch.distributed.get_rank() == 0
    bar = tqdm(total=total, initial=start, desc=desc, leave=False, disable=not progress)
    for step in range(start, total):
        faults.maybe_kill("train", step)
        t0 = time.time()
        losses = update(step)
        if compute is not None:
            compute.seconds += time.time() - t0
        if faults.hit("nan", "train", step):
            losses = {**losses, "injected": float("nan")}
        for k, v in losses.items():
            if not math.isfinite(v):
                raise DivergenceError(f"{desc} loss {k!r}", step)
            window.setdefault(k, []).append(v)
        if (step + 1) % log_every == 0 or step + 1 == total:
            for k, vs in window.items():
                log.setdefault(k, []).append(round(sum(vs) / len(vs), 6))
            window = {}
            bar.set_postfix({k: v[-1] for k, v in log.items()})
        bar.update(1)
        if ((step + 1) % ckpt_every == 0 or step + 1 == total) and rank0:
            save_checkpoint(ckpt, step + 1, modules, optimizers,
                            {"log": log, "window": window, "passes": compute.state() if compute is not None else {}})
    bar.close()
    for h in handles:
        h.remove()
    return log


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _sync_gradients(modules: dict[str, nn.Module]) -> list:
    """Data-parallel training (as DDP does): average every gradient across processes as it accumulates.

    Identical initial weights + averaged gradients + identical optimizers keep every process's copy equal.
    """
    if not _distributed():
        return []
    world = torch.distributed.get_world_size()

    def hook(p):
        torch.distributed.all_reduce(p.grad)
        p.grad /= world

    return [p.register_post_accumulate_grad_hook(hook) for m in modules.values() for p in m.parameters()
            if p.requires_grad]


def _read_card(path: Path) -> dict | None:
    """A cached student's card ({"sha256", "info"}), or None when it is missing, cut short or malformed."""
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(card, dict) and isinstance(card.get("sha256"), str) and isinstance(card.get("info"), dict)
    return card if ok else None


def state_path(cache_dir: Path, stem: str) -> Path:
    """Where a cached student's final training state (every module and optimizer, the counts) is kept, when kept."""
    return Path(cache_dir) / f"{stem}.state.safetensors"


def cached_student(cache_dir: Path, stem: str, train, load, write: bool = True, keep_state: bool = False,
                   continue_from: Path | None = None) -> dict:
    """Load a trained student from the cache, or train it and cache it (safetensors + card with sha256).

    ``train(ckpt_path) -> (state_dict, info dict)``; ``load(state_dict)`` installs the weights. A corrupt cache
    entry — a card that is missing, cut short or malformed, weights whose sha256 does not match the card, or that
    do not load — is warned about and retrained (and overwritten). `keep_state`: keep the training's final
    checkpoint beside the student (``state_path``) so a longer training of the same kind can continue it;
    `continue_from`: such a state, copied to the checkpoint a new training resumes from (``run_updates``).
    """
    from safetensors.torch import load_file

    path = Path(cache_dir) / f"{stem}.safetensors"
    card_path = path.with_suffix(".json")
    if path.exists() or card_path.exists():
        card = _read_card(card_path)
        if card is not None and path.exists() and card["sha256"] == io.sha256_file(path):
            try:
                load(load_file(str(path)))
                return {**card["info"], "cached": True, "checkpoint": path.name, "checkpoint_sha256": card["sha256"]}
            except (OSError, RuntimeError, KeyError, ValueError) as e:
                why = f"its weights do not load ({type(e).__name__})"
        else:
            why = ("its card is unreadable" if card is None else "its weights are missing" if not path.exists()
                   else "its weights do not match the card's sha256")
        import warnings

        warnings.warn(f"ignoring the corrupt cached student {path.name} ({why}); training it again", stacklevel=2)
    ckpt = path.with_suffix(".ckpt.safetensors")
    if continue_from is not None and not ckpt.exists() and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(f".{ckpt.name}.tmp")
        shutil.copyfile(continue_from, tmp)
        tmp.replace(ckpt)
    state, info = train(ckpt)
    if not write:  # another process (rank 0) writes the cache entry; this one keeps its identical weights
        load(state)
        return {**info, "cached": False, "checkpoint": path.name, "checkpoint_sha256": None}
    digest = io.save_tensors(path, state)
    io.write_json(card_path, {"sha256": digest, "info": info})
    if ckpt.exists():
        if keep_state:
            ckpt.replace(state_path(cache_dir, stem))
        else:
            ckpt.unlink()
    load(state)
    return {**info, "cached": False, "checkpoint": path.name, "checkpoint_sha256": digest}
