"""The memory plan (bench.plan) and what it stands on: the meta-device tracker (bench.memtrack), the shipped
architecture configs (bench/archs), the per-method footprints (bench.footprints).

What each test proves:
- the shipped configs build networks of the published sizes (each figure's source is in bench/archs/*.json), and
  the check catches a config one transformer block short;
- the tracker's bytes equal closed forms on a chain of Linear layers (no-grad forward, saved activations,
  gradients, AdamW's step, the autocast weight cache), and the CPU allocator's own record on a tiny diffusers UNet
  (torch.profiler memory events: to the byte in fp32; under autocast the meta emulation equals the real run's
  tensors op for op, and the allocator adds only kernel workspaces);
- a plan over the device's memory is refused with one line naming the setting that fixes it;
- offload removes exactly the text encoders' bytes from a decode-bound peak;
- 8 ranks shrink the sampling batch (when a shard is smaller than a batch) and its activations, never the weights;
- the command's Markdown for SDXL is what tests/data/plan-sdxl.md holds.
"""

import json
import re

import pytest
import torch

from bench import networks as N
from bench import plan as P
from bench.footprints import Entry, footprint
from bench.memtrack import CudaKernels, LiveBytes, Usage, backward, measure
from core.errors import UserError
from tests.conftest import DATA

ALL_COMPONENTS = [(a, c) for a in N.arch_names() for c in N.load_arch(a).components]


def half_unit(quoted: str, value: int) -> float:
    """Half a unit in the last printed digit of a quoted figure ("2.6B" -> 0.05e9), relative to `value`."""
    number = re.match(r"[0-9.,]+", quoted)[0].replace(",", "")
    decimals = len(number.split(".")[1]) if "." in number else 0
    return 0.5 * 10 ** -decimals * value / float(number)


@pytest.mark.parametrize("arch,name", ALL_COMPONENTS)
def test_parameter_counts_match_published_figures(arch, name):
    """Within 1 %, or within the figure's printed precision when coarser (SDXL's UNet is printed "2.6B": ±1.9 %)."""
    comp = N.load_arch(arch).components[name]
    pub = comp.published
    assert pub and pub["source"], f"{arch}/{name} names no published figure"
    count = N.param_count(N.build(comp))
    tolerance = max(0.01, half_unit(pub["quoted"], pub["params"]) / pub["params"])
    assert abs(count - pub["params"]) <= tolerance * pub["params"], (count, pub)


def test_the_count_check_catches_a_wrong_config():
    """SDXL's UNet with one transformer block fewer at the lowest level is 3.6 % smaller: outside the tolerance."""
    comp = N.load_arch("sdxl").denoiser
    wrong = N.Component(comp.name, {**comp.config, "transformer_layers_per_block": [1, 2, 9]}, comp.published)
    count = N.param_count(N.build(wrong))
    assert abs(count - comp.published["params"]) > 0.019 * comp.published["params"]


def test_lora_count_is_what_peft_adds():
    net = N.build(N.load_arch("sd15").denoiser, torch.float32)
    before = N.param_count(net)
    expected = N.lora_param_count(net, 8)
    N.add_lora(net, 8)
    assert N.param_count(net) - before == expected == sum(p.numel() for p in net.parameters() if p.requires_grad)


# --- the tracker against closed forms ------------------------------------------------------------------------------

L, BATCH, D = 4, 8, 64


@pytest.fixture
def chain():
    with torch.device("meta"):
        return torch.nn.Sequential(*[torch.nn.Linear(D, D) for _ in range(L)])


def test_no_grad_forward_holds_input_and_two_activations(chain):
    def run(_):
        with torch.no_grad():
            chain(torch.randn(BATCH, D, device="meta"))
    assert measure(run) == Usage(3 * BATCH * D * 4, 0)  # x, y_k and y_k+1 at once (bytes, fp32); nothing kept


def test_grad_forward_keeps_every_input_and_backward_leaves_gradients(chain):
    seen = {}

    def run(tracker):
        x = torch.randn(BATCH, D, device="meta")
        y = chain(x)
        seen["forward"] = tracker.live
        backward(y.sum())
        seen["end"] = tracker.live

    measure(run)
    act, grads = BATCH * D * 4, L * (D * D + D) * 4
    assert seen["forward"] == (L + 1) * act  # autograd saves each layer's input; plus the output
    assert seen["end"] == grads + 2 * act  # the graph freed; .grad of every weight and bias, x and y still referenced


def test_adamw_step_allocates_one_copy_of_the_parameters(chain):
    opt = P._adamw(chain.parameters())
    params = sum(p.numel() for p in chain.parameters())
    seen = {}

    def run(tracker):
        for p in chain.parameters():
            p.grad = torch.empty_like(p)
        seen["before"] = tracker.live
        opt.step()

    usage = measure(run)
    assert usage.peak - seen["before"] == 4 * params  # foreach AdamW: sqrt of exp_avg_sq for every parameter at once


def test_autocast_casts_weights_once_and_keeps_them(chain):
    chain.requires_grad_(True)
    seen = {}

    def run(tracker):
        x = torch.randn(BATCH, D, device="meta")
        y = chain(x)  # noqa: F841 (the output keeps the graph, and so the saved tensors, alive)
        seen["forward"] = tracker.live

    usage = measure(run, autocast=torch.bfloat16)
    cache = L * (D * D + D) * 2  # every weight and bias, cast to bf16 once for the region
    assert seen["forward"] == BATCH * D * 4 + BATCH * D * 2 + L * BATCH * D * 2 + cache  # x, x in bf16, bf16 outputs
    assert usage.end == cache


# --- the tracker against the CPU allocator on a tiny diffusers UNet -------------------------------------------------

TINY = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def _tiny_unet(device: str, lora: int = 0, checkpointing: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        net = UNet2DConditionModel(**TINY)
    if lora:
        N.add_lora(net, lora) if device == "meta" else _lora_cpu(net, lora)
    if checkpointing:
        net.enable_gradient_checkpointing()
    return net


def _lora_cpu(net, rank):
    from peft import LoraConfig

    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for n, p in net.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)


def _update(net, device: str, opt=None, grad: bool = True):
    """One forward at batch 4 (and a backward and AdamW step with `grad`): inputs made inside."""
    x = torch.randn(4, 4, 16, 16, device=device)
    states = torch.randn(4, 7, 32, device=device)
    with torch.set_grad_enabled(grad):
        out = net(x, torch.full((4,), 500, device=device), encoder_hidden_states=states).sample
    if grad:
        opt.zero_grad(set_to_none=True)
        backward(out.float().square().mean())
        opt.step()


def _allocator_peak(fn) -> int:
    """The CPU allocator's peak bytes over `fn()`, from torch.profiler's memory events (allocations and frees)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _dispatched_peak(net, opt, grad: bool, autocast: bool) -> int:
    """The real CPU run's peak as the tracker counts it (tensors the dispatcher sees, not kernels' own buffers)."""
    real = LiveBytes()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), real:
        _update(net, "cpu", opt, grad)
    net.zero_grad(set_to_none=True)
    return real.peak


@pytest.mark.parametrize("grad,lora,checkpointing", [(False, 0, False), (True, 0, False), (True, 4, True)])
def test_meta_peak_equals_the_real_cpu_run_in_fp32(grad, lora, checkpointing):
    """The meta run holds the real run's tensors, but for the attention kernel's random-state scalars (CUDA's efficient
    kernel returns them, CPU's flash kernel does not: a few bytes per call); the CPU allocator's record of the real run
    adds only what kernels allocate inside themselves (contiguous copies for the LoRA matmuls: < 1 %)."""
    cpu, meta = _tiny_unet("cpu", lora, checkpointing), _tiny_unet("meta", lora, checkpointing)
    opt_cpu = P._adamw(cpu.parameters()) if grad else None
    opt_meta = P._adamw(meta.parameters()) if grad else None
    dispatched = _dispatched_peak(cpu, opt_cpu, grad, autocast=False)  # also the warm-up of lazy initialisations
    allocated = _allocator_peak(lambda: _update(cpu, "cpu", opt_cpu, grad))
    planned = measure(lambda _: _update(meta, "meta", opt_meta, grad), policy="cpu").peak
    assert 0 <= planned - dispatched <= 1e-4 * dispatched
    assert 0.9999 * planned <= allocated <= 1.01 * planned


@pytest.mark.parametrize("grad", [False, True])
def test_autocast_emulation_equals_real_cpu_autocast(grad):
    """The emulation holds the real CPU autocast run's tensors (to 0.1 %: meta's group_norm keeps its statistics in
    bf16 where the CPU kernel keeps fp32); the allocator adds the bf16 kernels' own workspaces, under a quarter."""
    cpu, meta = _tiny_unet("cpu"), _tiny_unet("meta")
    opt_cpu = P._adamw(cpu.parameters()) if grad else None
    opt_meta = P._adamw(meta.parameters()) if grad else None
    dispatched = _dispatched_peak(cpu, opt_cpu, grad, autocast=True)
    planned = measure(lambda _: _update(meta, "meta", opt_meta, grad), autocast=torch.bfloat16, policy="cpu").peak
    assert abs(planned - dispatched) <= 1e-3 * dispatched

    def allocated():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _update(cpu, "cpu", opt_cpu, grad)
    assert planned <= _allocator_peak(allocated) <= 1.25 * planned


def test_fused_attention_holds_no_attention_matrix():
    """On meta the math kernel would hold B·H·N² scores; the fused kernel keeps the output and a log-sum-exp."""
    b, h, n, d = 2, 4, 1024, 64

    def run(_):
        q = torch.randn(b, h, n, d, device="meta", dtype=torch.bfloat16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    fused = measure(run).peak - (2 * b * h * n * d * 2 + b * h * n * 4)  # q, output (bf16), log-sum-exp (fp32)
    assert 0 <= fused < 64  # and the kernel's random-state scalars
    tracker = LiveBytes()
    with tracker:
        q = torch.randn(b, h, n, d, device="meta", dtype=torch.bfloat16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert tracker.peak > b * h * n * n * 2  # without CudaKernels: meta's math path and its N×N scores
    with CudaKernels():
        assert torch.backends.cuda.flash_sdp_enabled()


# --- the plan -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_lab():
    return P.Lab(P.Setup(N.load_arch("sd15"), "bf16", batch_size=16, samples=16, clip_model=None, inception=False))


def test_a_plan_over_the_device_is_refused_naming_the_fix(sd15_lab):
    teacher = Entry("teacher", {"guidance": "cfg"})
    options = P.Options(device_memory=P.parse_bytes("8GB"), reserve=0)
    plans = P.plan_suite(sd15_lab.setup, [teacher], options, sd15_lab)
    assert plans[0].peak.name == "decode" and plans[0].peak.total > options.device_memory
    with pytest.raises(UserError) as e:
        P.check(sd15_lab, plans)
    msg = str(e.value)
    assert "\n" not in msg and "decode phase" in msg and "set [backbone] vae_slicing = true" in msg
    fixed = P.plan_suite(sd15_lab.setup, [teacher], P.Options(vae_slicing=True, device_memory=options.device_memory,
                                                              reserve=0), sd15_lab)
    P.check(sd15_lab, fixed)  # and the named setting does fit


def test_a_training_plan_over_the_device_names_a_fix_that_fits(sd15_lab):
    lcm = Entry("lcm")  # its default training batch, 32
    options = P.Options(device_memory=P.parse_bytes("24GB"), reserve=0, offload="model")
    plans = P.plan_suite(sd15_lab.setup, [lcm], options, sd15_lab)
    assert plans[0].peak.name == "train"
    with pytest.raises(UserError) as e:
        P.check(sd15_lab, plans)
    m = re.search(r"set lcm settings: (batch_size = (\d+)|gradient_checkpointing = true) \(", str(e.value))
    assert m, str(e.value)
    fixed = Entry("lcm", {"batch_size": int(m[2])} if m[2] else {"gradient_checkpointing": True})
    P.check(sd15_lab, P.plan_suite(sd15_lab.setup, [fixed], options, sd15_lab))


def test_offload_removes_the_text_encoders_from_a_decode_bound_peak(sd15_lab):
    teacher = Entry("teacher", {"guidance": "cfg"})
    none, model = (P.plan_suite(sd15_lab.setup, [teacher], P.Options(offload=o), sd15_lab)[0] for o in ("none", "model"))
    assert none.peak.name == model.peak.name == "decode"
    text_encoders = sum(2 * sd15_lab.params(c.name) for c in sd15_lab.arch.text_encoders)  # bf16
    assert none.peak.total - model.peak.total == text_encoders


def test_eight_ranks_shrink_the_sampling_batch_not_the_weights(sd15_lab):
    teacher = Entry("teacher", {"guidance": "cfg"})
    one, eight = (P.plan_suite(sd15_lab.setup, [teacher], P.Options(ranks=r), sd15_lab)[0] for r in (1, 8))
    assert (one.sample_batch, eight.sample_batch) == (16, 2)  # 16 samples: 2 per rank
    phase = {p.name: p for p in one.phases}, {p.name: p for p in eight.phases}
    assert phase[1]["sample"].activations < phase[0]["sample"].activations
    assert one.networks == eight.networks and phase[1]["sample"].resident == phase[0]["sample"].resident
    many = P.Lab.sharing(sd15_lab, P.Setup(sd15_lab.arch, "bf16", batch_size=16, samples=5000, clip_model=None,
                                           inception=False))
    assert P.plan_suite(many.setup, [teacher], P.Options(ranks=8), many)[0].sample_batch == 16  # shards of 625


def test_footprints_follow_the_methods(sd15_lab):
    """LoRA above the threshold (SD1.5's 860 M), fp32 masters and an EMA for LCM, a fake score for DMD2, a checkpoint
    in the backbone's dtype at its recipe's resolution, every student kept (imagine-flash: one per step count)."""
    lcm = footprint(sd15_lab, Entry("lcm")).training
    assert lcm.student == "lora" and lcm.rank == 64 and [s for s, _ in lcm.state][2] == "EMA copy"
    assert footprint(sd15_lab, Entry("lcm", {"lora_rank": 0})).training.student == "full"
    assert footprint(sd15_lab, Entry("dmd2")).training.fake
    assert footprint(sd15_lab, Entry("pretrained", {"path": "dir"})).kept[0].dtype == "bf16"
    turbo = footprint(sd15_lab, Entry("pretrained", {"path": "x.safetensors", "recipe": "sd-turbo"}))
    assert (turbo.sample_batch, turbo.resolution) == (1, 512)
    assert len(footprint(sd15_lab, Entry("imagine-flash", steps=(1, 2, 3))).kept) == 3
    with pytest.raises(UserError, match="unknown method to plan"):
        footprint(sd15_lab, Entry("nope"))


def test_bad_input_is_one_line():
    assert (P.parse_bytes("80GB"), P.parse_bytes("1GiB"), P.parse_bytes("80")) == (80 * 10**9, 2**30, 80)
    for bad in ("eighty GB", "-1GB", "0GB", ""):
        with pytest.raises(UserError, match="like 80GB"):
            P.parse_bytes(bad)
    with pytest.raises(UserError, match="did you mean 'sdxl'"):
        N.load_arch("sdx")
    assert P.main(["--arch", "sdxl", "--device-memory", "lots"]) == 2
    with pytest.raises(UserError, match="leaves nothing beside the 2.0 GiB reserve"):
        P.Options(device_memory=P.parse_bytes("1GB"))


def test_a_diffusers_directory_plans_like_the_shipped_arch(tmp_path):
    arch = N.load_arch("sdxl")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    for name, comp in arch.components.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(comp.config))
    mine = N.arch_from_directory(tmp_path)
    assert mine.resolution == arch.resolution and mine.components.keys() == arch.components.keys()
    assert N.param_count(N.build(mine.denoiser)) == N.param_count(N.build(arch.denoiser))
    (tmp_path / "vae" / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json for vae"):
        N.arch_from_directory(tmp_path)


SDXL_ARGS = ["--arch", "sdxl", "--device-memory", "80GB", "--ranks", "1,8", "--batch-size", "4", "--samples", "8",
             "--methods", "teacher,pretrained,lcm", "--train-batch", "1", "--explain"]


def test_the_sdxl_command_output_is_stable(capsys):
    """tests/data/plan-sdxl.md is `python -m bench.plan` with SDXL_ARGS; regenerate it with that command."""
    assert P.main(SDXL_ARGS) == 0
    out = capsys.readouterr().out
    assert out == (DATA / "plan-sdxl.md").read_text(encoding="utf-8")


def test_refresh_rewrites_only_plan_blocks(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- plan: --arch sd15 -->\nold\n<!-- end plan -->\noutro\n")
    monkeypatch.setattr(P, "command", lambda args: (f"new {args.arch}\n", None, []))
    assert P.refresh(str(doc)) == 1
    assert doc.read_text() == "intro\n<!-- plan: --arch sd15 -->\nnew sd15\n<!-- end plan -->\noutro\n"
    with pytest.raises(UserError, match="does not exist"):
        P.refresh(str(tmp_path / "missing.md"))


def test_a_suites_tables_give_the_setup(tmp_path):
    """What the dry run calls: setup_from_suite reads a suite's [backbone] and [evaluators] tables."""
    arch = N.load_arch("sd15")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for name, comp in arch.components.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(comp.config))
    backbone = {"kind": "diffusers", "path": str(tmp_path), "dtype": "fp16", "vae_dtype": "fp32", "offload": "model",
                "vae_slicing": True}
    setup = P.setup_from_suite(backbone, {"kind": "real", "clip_model": "ViT-L-14"}, batch_size=8, samples=100)
    assert (setup.dtype, setup.vae_dtype, setup.batch_size, setup.samples, setup.clip_model, setup.arch.resolution) == \
        ("fp16", "fp32", 8, 100, "ViT-L-14", 512)
    options = P.options_from_suite(backbone, ranks=4)
    assert (options.ranks, options.offload, options.vae_slicing, options.vae_tiling) == (4, "model", True, False)
    with pytest.raises(UserError, match="kind = 'diffusers'"):
        P.setup_from_suite({"kind": "shapes"}, {"kind": "shapes"}, 8)


def test_the_dry_run_recipe_plans_a_parsed_suite(tmp_path):
    """bench.plan's docstring recipe on a suite as bench.suite parses it (a tiny SDXL directory written here): the
    entries' Configs, with the family's conventions, plan as the methods see them; the plan measures the tiny nets."""
    import dataclasses

    from bench import suite as S
    from tests import tiny_sd

    pipe = tiny_sd.build(tmp_path / "sdxl", sdxl=True)
    suite = S.parse({"prompts": "shapes-eval", "samples": 8, "batch_size": 4, "metrics": ["clip_score"],
                     "backbone": {"kind": "diffusers", "path": str(pipe), "dtype": "bf16", "offload": "model"},
                     "methods": [{"name": "teacher", "steps": [2]}, {"name": "lcm", "steps": [1, 2],
                                                                      "settings": {"batch_size": 2}}]})
    setup = P.setup_from_suite(suite.backbone, suite.evaluators, suite.batch_size, suite.samples)
    options = P.options_from_suite(suite.backbone, ranks=2, device_memory=P.parse_bytes("4GB"))
    entries = [Entry(e.name, dataclasses.asdict(e.config), tuple(b.steps for b in e.budgets), e.label)
               for e in suite.entries]
    lab = P.Lab(setup)
    plans = P.plan_suite(setup, entries, options, lab)
    assert [p.entry.name for p in plans] == ["teacher", "lcm"] and plans[0].sample_batch == 4  # 8 samples, 2 ranks
    assert options.offload == "model" and plans[1].train_batch == 2 and plans[1].kept[0][0] == "student (bf16)"
    P.check(lab, plans)  # tiny networks: kilobytes


def test_flashbench_run_plans_a_real_scale_suite_before_loading_and_refuses_what_does_not_fit(tmp_path):
    """`flashbench run --dry-run` prints each entry's plan; a device too small for it is refused in one line naming a
    fix, before any weight loads and with nothing written; a device it fits passes."""
    from tests import tiny_sd
    from tests.test_cli import flashbench_in_process

    pipe = tiny_sd.build(tmp_path / "sdxl", sdxl=True)
    ref, inc = tiny_sd.image_folder(tmp_path / "ref", 4), tiny_sd.fake_inception(tmp_path / "inc")
    (tmp_path / "s.toml").write_text(f'name = "dr"\nprompts = "shapes-eval"\nsamples = 4\nbatch_size = 2\n'
                                     f'metrics = ["clip_score"]\n[backbone]\nkind = "diffusers"\npath = "{pipe}"\n'
                                     f'dtype = "bf16"\n[evaluators]\nkind = "real"\nclip_model = "ViT-B-32"\n'
                                     f'reference = "{ref}"\ninception_dir = "{inc}"\n'
                                     '[[methods]]\nname = "teacher"\nsteps = [4]\n[[methods]]\nname = "lcm"\nsteps = [2]\n')
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from bench.cli import main

        assert main(["run", str(tmp_path / "s.toml"), "--dry-run", "--device-memory", "80GB"]) == 0
    assert "| teacher | 1 |" in out.getvalue() and "| lcm | 1 |" in out.getvalue() and "nothing written" in out.getvalue()
    code, err = flashbench_in_process("run", tmp_path / "s.toml", "--out", tmp_path / "run", "--device-memory", "2.3GB",
                                      cwd=tmp_path)
    assert code == 2 and "plan does not fit: teacher (1 rank) needs" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
