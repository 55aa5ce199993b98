"""The backbone families as a registry, their settings and conventions, and the contracts a GPU would enforce,
checked on the CPU: every sampling network in the row's dtype, compilation recorded per network, each method's
networks released after its last cell."""

import gc
import json
import weakref

import pytest
import torch

from core.errors import UserError
from methods import backbones, base
from tests import tiny_flow, tiny_sd

TEXTS = ["a large red circle at the top left", "a small blue square in the center"]
KEYS = [("p0", 0), ("p1", 0)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    return {"sd": tiny_sd.build(d / "sd"), "sdxl": tiny_sd.build(d / "sdxl", sdxl=True),
            "flux": tiny_flow.build_flux(d / "flux"), "flux-schnell": tiny_flow.build_flux(d / "schnell", guidance_embeds=False),
            "sd3": tiny_flow.build_sd3(d / "sd3"), "data": tiny_sd.image_folder(d / "data")}


def test_every_family_is_one_registered_file_found_by_its_pipeline(dirs):
    assert backbones.names() == ["flux", "sd", "sd3", "sdxl"]
    for name, d in backbones.declared().items():
        cls = backbones.get(name)
        assert cls.family == name and cls.pipelines == d["pipelines"] and cls.__module__ == d["module"]
        assert cls.__module__ == f"methods.backbones.{name}"  # the family's own file
    for key, path in dirs.items():
        if key != "data":
            assert backbones.family_of(path) == key.split("-")[0]


def suite(path, methods, **backbone):
    from bench import suite as suite_mod

    raw = {"prompts": "shapes-eval", "samples": 2, "metrics": ["clip_score"],
           "backbone": {"kind": "diffusers", "path": str(path), **backbone}, "methods": methods}
    return suite_mod.parse(raw, "test.toml")


def test_unset_method_settings_take_the_pipelines_conventions(dirs):
    """The teacher's guidance is its pipeline's default, not the embedded world's 1.5: SD 7.5, SDXL 5, SD3 7 (CFG,
    2 NFE per step), FLUX.1-dev its guidance embedding at 3.5 (1 NFE per step), FLUX.1-schnell none."""
    want = {"sd": ("cfg", 7.5, 8), "sdxl": ("cfg", 5.0, 8), "sd3": ("cfg", 7.0, 8), "flux": ("embedded", 3.5, 4),
            "flux-schnell": ("none", None, 4)}
    for key, (form, scale, nfe) in want.items():
        s = suite(dirs[key], [{"name": "teacher", "steps": [4]}])
        cfg = s.entries[0].config
        assert (cfg.guidance, s.entries[0].budgets[0].nfe) == (form, nfe), key
        if scale is not None:
            assert cfg.guidance_scale == scale, key
    # what the suite says wins; a distillation's guidance and w-range follow the family's training recipe
    s = suite(dirs["sdxl"], [{"name": "teacher", "steps": [4], "settings": {"guidance_scale": 8.0}},
                             {"name": "lcm", "steps": [4]}])
    assert s.entries[0].config.guidance_scale == 8.0
    assert (s.entries[1].config.guidance_scale, s.entries[1].config.w_min, s.entries[1].config.w_max) == (5.0, 4.0, 16.0)
    assert s.entries[0].settings == {"guidance_scale": 8.0}  # the entry records what the suite said


def test_the_embedded_teachers_keep_their_studied_defaults():
    from bench import suite as suite_mod

    vp = suite_mod.parse({"methods": [{"name": "teacher", "steps": [2]}]}, "vp.toml")
    flow = suite_mod.parse({"backbone": {"kind": "shapes", "teacher": "flow"},
                            "methods": [{"name": "teacher", "steps": [2]}, {"name": "lcm", "steps": [2]}]}, "flow.toml")
    assert (vp.entries[0].config.guidance, vp.entries[0].config.guidance_scale) == ("cfg", 1.5)
    assert flow.entries[0].config.guidance == "none" and flow.entries[0].budgets[0].nfe == 2
    assert (flow.entries[1].config.guidance_scale, flow.entries[1].config.w_min) == (1.0, 1.0)


@pytest.mark.parametrize("setting, match", [
    ({"vae": "fp32"}, "vae is a folder holding another VAE, got 'fp32'; for the VAE's precision set vae_dtype = 'fp32'"),
    ({"compile": "inductor"}, "compile must be a torch.compile mode \\(default, reduce-overhead, max-autotune"),
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"resolutoin": 512}, "did you mean 'resolution'"),
    ({"max_sequence_length": 77}, "unknown setting for .*\\(sdxl\\) 'max_sequence_length'"),
    ({"offload": "sequential"}, "offload must be one of"),
    ({"channels_last": "yes"}, "setting 'channels_last' must be"),
])
def test_backbone_settings_are_checked_when_the_suite_is_parsed(dirs, setting, match):
    with pytest.raises(UserError, match=match):
        suite(dirs["sdxl"], [{"name": "teacher", "steps": [1]}], **setting)


def test_settings_as_the_readme_writes_them(dirs):
    """compile is a torch.compile mode (not a backend), vae_dtype the VAE's precision, resolution an image side."""
    bb = backbones.load_dir(dirs["sdxl"], compile="max-autotune", vae_dtype="fp32", resolution=32, channels_last=True)
    assert bb.resolution == 32 and bb.sample_shape == (4, 16, 16) and bb.vae.dtype == torch.float32
    assert base.get("teacher")  # the network is compiled lazily (first call); it is marked with its mode
    from methods.backbone import compiled_mode

    assert compiled_mode(bb.net) == "max-autotune" and bb.identity()["compile"] == "max-autotune"
    cond = bb.encode_text(TEXTS)
    assert cond.added["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]  # SDXL's target size follows the resolution


def test_a_pipeline_no_family_loads_is_named(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    with pytest.raises(UserError, match="a QwenImagePipeline \\(not supported yet\\); flashbench loads FluxPipeline, "
                                        "StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline"):
        suite(tmp_path, [{"name": "teacher", "steps": [1]}])


def test_offload_keeps_encoders_and_vae_off_the_device_until_used(dirs):
    bb = backbones.load_dir(dirs["sd"], offload="model")
    assert bb.settings.offload == "model" and bb.identity()["offload"] == "model"
    seen = []
    enc = bb.text_encoders[0]
    hook = enc.register_forward_pre_hook(lambda m, a: seen.append(next(m.parameters()).device.type))
    plain = backbones.load_dir(dirs["sd"])
    assert torch.equal(bb.encode_text(TEXTS).states, plain.encode_text(TEXTS).states)
    assert torch.equal(bb.to_images(torch.zeros(1, *bb.sample_shape)), plain.to_images(torch.zeros(1, *bb.sample_shape)))
    hook.remove()
    assert seen == ["cpu"]  # on this machine the device is the CPU: the path runs; on CUDA it moves there and back


@pytest.mark.parametrize("name", [n for n in base.names() if n != "pretrained"])
def test_every_sampling_network_is_in_the_rows_dtype(dirs, name, tmp_path):
    """A bf16 suite's rows say bf16: the teacher, and every student after training (fp32 masters), sample in bf16."""
    bb = backbones.load_dir(dirs["sd"], dtype="bf16", train_data=dirs["data"], train_workers=0)
    cls = base.get(name)
    m = cls(bb, cls.make_config(cls.smoke_settings()), base.Context(tmp_path, progress=False))
    steps = m.smoke_steps(m.config)[0]
    m.prepare(steps)
    m.sample(TEXTS, KEYS, steps)
    nets = m.networks()
    assert nets and all(p.dtype == torch.bfloat16 for net in nets for p in net.parameters() if p.is_floating_point())
    assert bb.identity()["dtype"] == "bf16"


def test_compilation_is_recorded_per_network(dirs, tmp_path):
    """Only networks that were compiled say so: a student of a compiled suite is compiled too, and the latency row
    lists each sampling network's mode."""
    from bench import latency
    from methods.backbone import compiled_mode

    bb = backbones.load_dir(dirs["sd"], compile="default", train_data=dirs["data"], train_workers=0)
    cls = base.get("lcm")
    m = cls(bb, cls.make_config(cls.smoke_settings()), base.Context(tmp_path, progress=False))
    m.prepare(1)
    assert [compiled_mode(n) for n in m.networks()] == ["default"]

    class Stub(base.Method):
        name, Config = "stub", object

        def sample(self, texts, noise_keys, steps):
            return torch.zeros(len(texts), 3, 4, 4)

    eager = torch.nn.Linear(1, 1)
    stub = Stub(bb, None, base.Context(tmp_path))
    stub.counted(bb.net), stub.counted(eager)
    from prompts import Prompt

    row = latency.measure(stub, [Prompt("p", "x")], 1, 2, "cpu", warmup=0, repeats=1)
    assert row["latency_protocol"]["compiled"] == ["default", None] and "latency_eager_ms" in row


def test_the_runner_releases_each_method_after_its_last_cell(tmp_path, monkeypatch):
    """A later row's memory holds the teacher and that row's method only: when a cell starts, no other entry's
    method is alive, and a released student network is garbage."""
    from bench import runner
    from bench import suite as suite_mod

    s = suite_mod.parse({"prompts": "shapes-eval", "samples": 2, "batch_size": 2, "metrics": ["clip_score"],
                         "train": {"student_updates": 1, "batch_size": 2},
                         "methods": [{"name": "lcm", "steps": [1, 2]}, {"name": "teacher", "steps": [1]}]}, "t.toml")
    alive, students = [], []
    run_cell = runner.run_cell

    def watched(ctx, cell):
        alive.append(sorted(label for label, _ in ctx.methods))
        row = run_cell(ctx, cell)
        if cell.entry.name == "lcm":
            students.extend(weakref.ref(n) for n in ctx.methods[("lcm", None)].networks())
        return row

    monkeypatch.setattr(runner, "run_cell", watched)
    runner.run(s, runner.Options(out=tmp_path / "run", cache=tmp_path / "cache", progress=False))
    assert alive == [[], ["lcm"], []]  # the lcm cells share their method; the teacher's cell starts alone
    gc.collect()
    assert students and all(ref() is None for ref in students)


def test_a_released_method_loads_again_when_used(dirs, tmp_path):
    bb = backbones.load_dir(dirs["sd"], train_data=dirs["data"], train_workers=0)
    cls = base.get("lcm")
    m = cls(bb, cls.make_config(cls.smoke_settings()), base.Context(tmp_path, progress=False))
    first = m.sample(TEXTS, KEYS, 1)
    m.release()
    assert m.networks() == [] and not m.nets
    assert torch.equal(first, m.sample(TEXTS, KEYS, 1))  # from the cache, the same student


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_backbone_assembled_from_modules_samples_as_the_loaded_one(dirs, family, tmp_path):
    """``assemble`` (real-sized random networks in the GPU check) runs the very sampling path of a loaded backbone."""
    loaded = backbones.load_dir(dirs[family], resolution=16)  # FLUX's own default is 1024 px: 64k tokens here
    cls = backbones.get(family)
    net = loaded.transformer if family == "flux" else loaded.net
    made = cls.assemble(loaded.settings, {"net": net, "vae": loaded.vae, "text_encoders": loaded.text_encoders,
                                          "tokenizers": loaded.tokenizers}, loaded.scheduler_config)
    assert made.identity()["family"] == family and made.identity()["files"] == {} and made.sample_shape == loaded.sample_shape
    teacher = base.get("teacher")
    cfg = teacher.make_config({"solver": "euler", "guidance": "cfg" if family == "sdxl" else "embedded"})
    a = teacher(loaded, cfg, base.Context(tmp_path)).sample(TEXTS, KEYS, 2)
    b = teacher(made, cfg, base.Context(tmp_path)).sample(TEXTS, KEYS, 2)
    assert torch.equal(a, b)


def test_a_published_checkpoint_samples_as_its_card_not_as_the_backbones_pipeline(dirs):
    """SDXL-Lightning runs unguided (1 NFE per step) on an SDXL backbone whose pipeline defaults to CFG at 5."""
    s = suite(dirs["sdxl"], [{"name": "pretrained", "steps": [4],
                              "settings": {"recipe": "sdxl-lightning-4step", "path": str(dirs["sdxl"])}}])
    cfg = s.entries[0].config
    assert (cfg.guidance, s.entries[0].budgets[0].nfe) == ("none", 4)


def test_a_student_in_a_bf16_region_sees_every_update():
    """Students train fp32 masters under autocast to the teacher's bf16: after an optimizer step the next forward in
    the same region must use the new weights (autocast's weight cache would keep the first cast copy)."""
    from methods.student import training_autocast

    net = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    x = torch.ones(2, 4)
    with torch.enable_grad(), training_autocast("cpu", torch.bfloat16):
        first = net(x)
        first.sum().backward()
        opt.step()
        second = net(x)
    assert first.dtype == torch.bfloat16 and not torch.equal(first, second)
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the cache this avoids: a stale forward
        a = net(x)
        a.sum().backward()
        opt.step()
        assert torch.equal(a, net(x))


def test_a_lora_student_keeps_its_frozen_base_in_the_teachers_dtype(dirs, tmp_path, monkeypatch):
    """With LoRA only what trains is fp32 (the adapters; LCM's w-embedding): the frozen base stays bf16 on a bf16
    teacher, as diffusers' LCM-LoRA scripts keep it (a fp32 copy of a 12 B base does not fit an 80 GB GPU)."""
    bb = backbones.load_dir(dirs["sd"], dtype="bf16", train_data=dirs["data"], train_workers=0)
    cls = base.get("lcm")
    m = cls(bb, cls.make_config({**cls.smoke_settings(), "lora_rank": 2}), base.Context(tmp_path, progress=False))
    seen, train = {}, m.train_student

    def spy(net, grid, ckpt):
        seen.update({n: (p.dtype, p.requires_grad) for n, p in net.named_parameters()})
        return train(net, grid, ckpt)

    monkeypatch.setattr(m, "train_student", spy)
    m.prepare(1)
    frozen = [v for n, v in seen.items() if "lora_" not in n and "cond_proj" not in n]
    trained = [v for n, v in seen.items() if "lora_" in n or "cond_proj" in n]
    assert frozen and set(frozen) == {(torch.bfloat16, False)}
    assert trained and set(trained) == {(torch.float32, True)}
    assert all(p.dtype == torch.bfloat16 for n in m.networks() for p in n.parameters())  # it samples in bf16
