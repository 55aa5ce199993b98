"""Cost of the real-scale path on real-*sized* networks with random weights: `python -m bench.gpucheck`.

For SD 1.5 (UNet at 64×64 latents, 512² images) and SDXL (128×128 latents, 1024²), in bf16 on the
device: the bare UNet forward at batch 2 (a guided step), and the bench's own sampler (the
``teacher`` method, DPM-Solver++ with CFG) at 1, 4 and 25 steps on a backbone whose text encoding
and decode are stand-ins (random conditioning of the real shapes, identity decode), so the
sampler's overhead over its network evaluations shows: ratio = sampler time / (NFE/2 × forward
time). Throughput at batch 8 and peak accelerator memory are recorded. Writes ``figures.json`` and
``figures.md`` into --out. ``--tiny`` runs the same code on scaled-down configs (the CPU check CI runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.latency import time_call
from core import io
from methods import base
from methods.backbone import Backbone, Cond
from methods.diffusion import Schedule

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            use_linear_projection=True)
# the same code on configs small enough for a CPU in CI
TINY = {"sd15": dict(SD15, sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4,
                     norm_num_groups=8),
        "sdxl": dict(SDXL, sample_size=8, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                     attention_head_dim=(4, 4, 4), cross_attention_dim=64, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=64 + 6 * 8, norm_num_groups=8)}
TOKENS = 77


class SyntheticBackbone(Backbone):
    """A real-sized random UNet behind the Backbone interface; text encoding and decode are shape-true stand-ins."""

    prediction_type = "epsilon"

    def __init__(self, config: dict, device: str, dtype: torch.dtype):
        from diffusers import DDPMScheduler, UNet2DConditionModel

        torch.manual_seed(0)
        self.device, self.dtype = torch.device(device), dtype
        self.net = UNet2DConditionModel(**config).to(self.device, dtype).eval().requires_grad_(False)
        self.scheduler_config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                     beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                                     timestep_spacing="trailing")
        self.schedule = Schedule.from_diffusers(DDPMScheduler.from_config(self.scheduler_config))
        self.sdxl = config.get("addition_embed_type") == "text_time"
        self.cross = config["cross_attention_dim"]
        self.size = config["sample_size"]
        self.pooled = config.get("projection_class_embeddings_input_dim", 0) - 6 * config.get("addition_time_embed_dim", 0)

    @property
    def sample_shape(self):
        return (4, self.size, self.size)

    def encode_text(self, texts, micro=None):
        n = len(texts)
        states = torch.randn(n, TOKENS, self.cross, device=self.device, dtype=self.dtype)
        if not self.sdxl:
            return Cond(states)
        r = self.size * 8
        return Cond(states, {"text_embeds": torch.randn(n, self.pooled, device=self.device, dtype=self.dtype),
                             "time_ids": torch.tensor([[r, r, 0, 0, r, r]], device=self.device,
                                                      dtype=self.dtype).repeat(n, 1)})

    def to_images(self, x0):
        return x0[:, :3]

    def from_images(self, images):
        raise NotImplementedError

    def training_batch(self, n, key):
        raise NotImplementedError

    def identity(self):
        return {"backbone": "synthetic", "params": sum(p.numel() for p in self.net.parameters())}


def check(name: str, config: dict, device: str, dtype: torch.dtype, steps=(1, 4, 25), repeats: int = 5) -> dict:
    """The figures of one backbone: forward ms, sampler ms and overhead ratio per step count, throughput, memory."""
    bb = SyntheticBackbone(config, device, dtype)
    cls = base.get("teacher")
    teacher = cls(bb, cls.make_config({"solver": "dpmsolver++"}), base.Context(Path(".")))
    cuda = device.startswith("cuda")
    x = torch.randn(2, *bb.sample_shape, device=bb.device, dtype=dtype)
    cond = bb.encode_text(["", "x"])
    t = torch.tensor([999, 999], device=bb.device)
    kw = {"added_cond_kwargs": cond.added} if cond.added else {}
    with torch.no_grad():
        fwd = time_call(lambda: bb.net(x, t, encoder_hidden_states=cond.states, **kw), device, 2, repeats)
    out = {"params": bb.identity()["params"], "dtype": str(dtype).replace("torch.", ""), "device": device,
           "forward_b2_ms": 1000 * fwd["median_s"], "sampler": {}}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with teacher.unpadded(), torch.no_grad():
        for s in steps:
            r = time_call(lambda s=s: teacher.sample(["x"], [("p", 0)], s), device, 1, repeats)
            out["sampler"][s] = {"ms": 1000 * r["median_s"], "overhead_ratio": r["median_s"] / (s * fwd["median_s"])}
        texts, keys = ["x"] * 8, [("p", i) for i in range(8)]
        thr = time_call(lambda: teacher.sample(texts, keys, 4), device, 1, max(2, repeats // 2))
    out["throughput_b8_4steps"] = 8 / thr["median_s"]
    out["peak_accelerator_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    print(f"{name}: {out['params'] / 1e6:.0f} M params, forward {out['forward_b2_ms']:.1f} ms at batch 2; "
          + ", ".join(f"{s} steps {v['ms']:.0f} ms (x{v['overhead_ratio']:.2f})" for s, v in out["sampler"].items()),
          file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--tiny", action="store_true", help="scaled-down configs: the same code in seconds on a CPU")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    configs = TINY if args.tiny else {"sd15": SD15, "sdxl": SDXL}
    t0 = time.time()
    figures = {name: check(name, cfg, args.device, dtype, repeats=2 if args.tiny else 5) for name, cfg in configs.items()}
    figures["_meta"] = {"tiny": args.tiny, "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    io.write_json(args.out / "figures.json", figures)
    lines = ["| backbone | params | forward ms (b=2) | 1 step ms (ratio) | 4 steps ms (ratio) | 25 steps ms (ratio) | "
             "img/s (b=8, 4 steps) | peak MB |", "|---|---|---|---|---|---|---|---|"]
    for name, f in figures.items():
        if name.startswith("_"):
            continue
        cells = " | ".join(f"{v['ms']:.1f} (x{v['overhead_ratio']:.2f})" for v in f["sampler"].values())
        peak = "—" if f["peak_accelerator_mb"] is None else f"{f['peak_accelerator_mb']:.0f}"
        lines.append(f"| {name} | {f['params'] / 1e6:.0f} M | {f['forward_b2_ms']:.1f} | {cells} | "
                     f"{f['throughput_b8_4steps']:.2f} | {peak} |")
    io.write_text(args.out / "figures.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
