"""The GPU check's measurements: real-*sized* SDXL and FLUX.1-dev pipelines with random weights, timed through the
very code a run uses, and the collectives on NCCL. ``bash scripts/gpu-check.sh`` calls it (``--tiny`` on a CPU).

``arch``: the networks of a shipped architecture (``bench/archs``: the UNet or transformer, every text encoder, the
VAE) built with random weights on the device in bf16, assembled into that family's backbone
(``DirectoryBackbone.assemble``; character-level tokenizers from ``bench.synthetic``), and the ``teacher`` method at
the family's conventions (SDXL: DPM-Solver++ with CFG 5; FLUX.1-dev: Euler with its guidance embedding at 3.5) timed
by ``bench.latency.measure`` at 1, 4 and 25 steps: per image at batch 1 and by stage (text encoding, denoising per
step, VAE decode), throughput at a batch, peak accelerator memory against the memory plan's prediction
(``bench.plan``, the same networks on the meta device), then compiled (torch.compile, default mode) against eager at
4 steps, with the compilation's time. ``collectives`` (under ``torchrun``): ``bench.dist.Dist``'s gather and sum on
the backend the run would use (NCCL on CUDA), checked for values. Writes ``figures.json`` and ``figures.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import latency
from bench import networks as N
from bench.synthetic import clip_tokenizer, t5_tokenizer
from core import io
from methods import base

ARCHS = ("sdxl", "flux1-dev")
FAMILY = {"StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux"}
# the schedulers the real directories ship (stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev
# scheduler/scheduler_config.json): the noise schedule is the family's, whatever the weights
SCHEDULERS = {
    "sdxl": {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
    "flux1-dev": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
}
TEACHER = {"sdxl": {"solver": "dpmsolver++"}, "flux1-dev": {"solver": "euler"}}  # guidance: the family's conventions
STEPS = (1, 4, 25)
PROMPT = "a photo of a red fox in the snow, highly detailed"


def tiny(arch: N.Arch) -> N.Arch:
    """The same architecture scaled down to seconds on a CPU: the very code path, small configs."""
    comps = {}
    for name, c in arch.components.items():
        cfg = dict(c.config)
        if c.class_name == "UNet2DConditionModel":
            cfg.update(block_out_channels=[32, 64, 64], transformer_layers_per_block=1, attention_head_dim=[4, 4, 4],
                       cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                       norm_num_groups=8, layers_per_block=1)
        elif c.class_name == "FluxTransformer2DModel":
            cfg.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                       axes_dims_rope=[4, 6, 6], joint_attention_dim=32, pooled_projection_dim=16)
        elif c.class_name == "AutoencoderKL":
            cfg.update(block_out_channels=[8, 16], down_block_types=cfg["down_block_types"][:2],
                       up_block_types=cfg["up_block_types"][:2], norm_num_groups=4, layers_per_block=1)
        elif c.class_name == "T5EncoderModel":
            cfg.update(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
        else:  # CLIP text encoders: SDXL's two together give the UNet's 64-d cross attention
            width = 32 if arch.layout == "unet" else 16
            cfg.update(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                       projection_dim=32 if name == "text_encoder_2" else width)
        comps[name] = dataclasses.replace(c, config=cfg, published=None)
    return dataclasses.replace(arch, components=comps, resolution=64 if arch.layout == "unet" else 32,
                               max_sequence_length=16 if arch.max_sequence_length else None)


def random_backbone(arch: N.Arch, device: str, dtype: str, compile: str = ""):
    """The arch's pipeline with random weights on `device`, behind its family's Backbone (``assemble``)."""
    from methods import backbones

    family = backbones.get(FAMILY[arch.pipeline])
    torch.manual_seed(0)
    nets = {name: N.build(c, N.DTYPES[dtype], device) for name, c in arch.components.items()}
    folder = Path(tempfile.mkdtemp(prefix="flashbench-gpucheck-"))
    toks = [t5_tokenizer(folder / n) if c.class_name == "T5EncoderModel" else clip_tokenizer(folder / n)
            for n, c in arch.components.items() if n.startswith("text_encoder")]
    extra = {"max_sequence_length": arch.max_sequence_length} if arch.max_sequence_length else {}
    settings = family.Settings(path="synthetic", dtype=dtype, resolution=arch.resolution, compile=compile, **extra)
    return family.assemble(settings, {"net": nets[arch.denoiser.name], "vae": nets["vae"],
                                      "text_encoders": [nets[n] for n in family.encoder_names],
                                      "tokenizers": toks}, SCHEDULERS[arch.name], device)


def planned_peak(arch: N.Arch, dtype: str, batch: int) -> int:
    """The memory plan's peak bytes for the teacher sampling at `batch` (text, sampling and decode phases)."""
    from bench import plan as P
    from bench.footprints import Entry

    setup = P.Setup(arch, dtype, batch, batch, clip_model=None, inception=False)  # no evaluators loaded here
    (p,) = P.plan_suite(setup, [Entry("teacher", {}, (4,), "teacher")], P.Options(), P.Lab(setup))
    return max(ph.total for ph in p.phases if ph.name in ("text", "sample", "decode"))


def check_arch(name: str, device: str, dtype: str, batch: int, repeats: int, compile: bool, small: bool) -> dict:
    """One architecture's figures (see the module docstring)."""
    from prompts import Prompt

    arch = N.load_arch(name)
    arch = tiny(arch) if small else arch
    cuda = device.startswith("cuda")
    t0 = time.time()
    bb = random_backbone(arch, device, dtype)
    cls = base.get("teacher")
    from bench.suite import conventional

    settings = conventional("teacher", TEACHER[name], bb.conventions(bb.settings))
    teacher = cls(bb, cls.make_config(settings), base.Context(Path(tempfile.mkdtemp())))
    prompts = [Prompt(f"p{i}", PROMPT) for i in range(batch)]
    out = {"arch": arch.name, "family": bb.family, "device": device, "dtype": dtype, "resolution": bb.resolution,
           "teacher": dict(settings), "build_s": round(time.time() - t0, 1),
           "params": {n: sum(p.numel() for p in m.parameters())
                      for n, m in [("denoiser", bb.net), ("vae", bb.vae), *zip(bb.encoder_names, bb.text_encoders)]},
           "steps": {}}
    for steps in STEPS:
        out["steps"][steps] = latency.measure(teacher, prompts, steps, batch, device, warmup=1, repeats=repeats)
    for b in (1, batch):  # measured peak of one sampling call against the plan's
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), teacher.unpadded():
            teacher.sample([PROMPT] * b, [(f"m{i}", 0) for i in range(b)], 4)
        out.setdefault("memory", {})[b] = {
            "measured_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "planned_mb": planned_peak(arch, dtype, b) / 2**20}
    if compile:
        bb.settings = dataclasses.replace(bb.settings, compile="default")
        bb.prepare_net(bb.net)
        t1 = time.time()
        lat = latency.measure(teacher, prompts, 4, batch, device, warmup=1, repeats=repeats)
        out["compiled"] = {**lat, "compile_and_measure_s": round(time.time() - t1, 1)}
    print(f"{name}: {sum(out['params'].values()) / 1e9:.2f} B params; " + ", ".join(
        f"{s} steps {v['latency_ms']:.0f} ms" for s, v in out["steps"].items()), file=sys.stderr)
    return out


def markdown(figures: dict) -> str:
    """figures.md: one row per architecture and step count, then memory and compiled-vs-eager rows."""
    lines = ["| arch | steps | ms (b=1) | text ms | denoise ms/step | decode ms | img/s (batch) | peak MB (b=1) |",
             "|---|---|---|---|---|---|---|---|"]
    mem = ["", "| arch | batch | measured peak MB | planned peak MB | measured / planned |", "|---|---|---|---|---|"]
    comp = ["", "| arch | compiled ms (4 steps, b=1) | eager ms | compile + measure s |", "|---|---|---|---|"]
    for name, f in figures.items():
        if name.startswith("_"):
            continue
        for s, v in f["steps"].items():
            peak = "—" if v["peak_accelerator_mb"] is None else f"{v['peak_accelerator_mb']:.0f}"
            lines.append(f"| {name} | {s} | {v['latency_ms']:.1f} | {v['latency_text_ms']:.1f} | "
                         f"{v['latency_step_ms']:.2f} | {v['latency_decode_ms']:.1f} | {v['throughput']:.2f} "
                         f"({v['throughput_batch']}) | {peak} |")
        for b, m in f["memory"].items():
            got = "—" if m["measured_mb"] is None else f"{m['measured_mb']:.0f}"
            ratio = "—" if m["measured_mb"] is None else f"{m['measured_mb'] / m['planned_mb']:.2f}"
            mem.append(f"| {name} | {b} | {got} | {m['planned_mb']:.0f} | {ratio} |")
        if "compiled" in f:
            c = f["compiled"]
            comp.append(f"| {name} | {c['latency_ms']:.1f} | {c.get('latency_eager_ms', float('nan')):.1f} | "
                        f"{c['compile_and_measure_s']} |")
    return "\n".join(lines + mem + (comp if len(comp) > 3 else [])) + "\n"


def collectives() -> int:
    """Under torchrun: Dist's gather and sum through the backend a run would use (NCCL when CUDA is there), on
    unequal shards, checked for values; rank 0 prints one line. Forces the process group even for one process."""
    from bench.dist import Dist, collective_device

    cuda = torch.cuda.is_available()
    d = Dist("cuda" if cuda else "cpu")
    if not torch.distributed.is_initialized():  # one process: Dist runs no collective; make one to check the path
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(d.local_rank)
        d.world, d.rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        d.backend = torch.distributed.get_backend()
        d.device = collective_device(d.backend, torch.device("cuda", d.local_rank) if cuda else torch.device("cpu"))
    n = 2 * d.world + 1
    mine = d.shard(n)
    got = d.gather(torch.arange(mine.start, mine.stop, dtype=torch.float32)[:, None].repeat(1, 3), n)
    total = d.sum([1.0, float(d.rank)])
    ok = torch.equal(got, torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)) and \
        total == [float(d.world), float(sum(range(d.world)))]
    if d.rank == 0:
        print(f"collectives: backend {d.backend}, world {d.world}, device {d.device}: {'ok' if ok else 'WRONG'}")
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("arch", help="real-sized random pipelines timed through the run's code")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--archs", default=",".join(ARCHS))
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    a.add_argument("--batch", type=int, default=4, help="throughput batch")
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--no-compile", action="store_true")
    a.add_argument("--tiny", action="store_true", help="scaled-down configs: the same code in seconds on a CPU")
    sub.add_parser("collectives", help="under torchrun: Dist's collectives on the run's backend")
    args = ap.parse_args(argv)
    if args.cmd == "collectives":
        return collectives()
    t0 = time.time()
    figures = {name: check_arch(name, args.device, args.dtype, args.batch, args.repeats,
                                not args.no_compile and not args.tiny, args.tiny)
               for name in args.archs.split(",")}
    figures["_meta"] = {"tiny": args.tiny, "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    io.write_json(args.out / "figures.json", figures)
    io.write_text(args.out / "figures.md", markdown(figures))
    print(markdown(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
