"""The networks of a real-scale pipeline, from their config.json alone: built on the meta device, counted, called.

An ``Arch`` is a pipeline's component configs as diffusers / transformers read them: shipped ones under
``bench/archs/`` (``load_arch``: sd15, sdxl, sd35-large, flux1-dev, each naming its source and a published
parameter figure per network) or a user's local diffusers directory (``arch_from_directory``: ``unet/`` or
``transformer/``, ``text_encoder*/``, ``vae/`` config.json; no weights are read). ``build`` instantiates a
component on the meta device (no memory, no initialisation cost), and the ``*_call`` functions run one
forward with inputs of the shapes the bench's backbones give it (``methods.backbones.sd`` / ``sdxl``,
``methods.backbones.flow``), created inside the call so that ``bench.memtrack.measure`` counts them.

Shapes: denoiser latents [B, C, R/8, R/8] (R the resolution in pixels; FLUX packs 2×2 patches into tokens as
``FlowNet``), text states [B, 77, D] (SD/SDXL), [B, 77 + L, 4096] (SD3, L T5 tokens) or [B, L, 4096] (FLUX),
images [B, 3, R, R] float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from core.errors import UserError, unknown

ARCHS_DIR = Path(__file__).parent / "archs"
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
CLIP_TOKENS = 77
LAYOUTS = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet", "StableDiffusion3Pipeline": "sd3",
           "FluxPipeline": "flux"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Component:
    """One network of a pipeline: its diffusers sub-folder name and its config.json (``published``: the parameter
    figure the shipped archs check against, {"params", "quoted", "source"}, or None)."""

    name: str
    config: dict
    published: dict | None = None

    @property
    def class_name(self) -> str:
        """The class that loads it: diffusers' ``_class_name`` or the transformers config's ``architectures[0]``."""
        if "_class_name" in self.config:
            return self.config["_class_name"]
        archs = self.config.get("architectures") or []
        if not archs:
            raise UserError(f"{self.name}/config.json names no class (_class_name or architectures)")
        return archs[0]


@dataclasses.dataclass(frozen=True)
class Arch:
    """A pipeline's networks and the shapes they run at.

    `resolution`: image side in pixels; `max_sequence_length`: T5 tokens (None without T5); `guidance`: the
    teacher's default guidance form (cfg, or embedded for a guidance-distilled FLUX.1-dev).
    """

    name: str
    title: str
    source: str
    pipeline: str
    resolution: int
    guidance: str
    components: dict[str, Component]
    max_sequence_length: int | None = None

    @property
    def layout(self) -> str:
        """"unet" (SD/SDXL), "sd3" or "flux"."""
        return LAYOUTS[self.pipeline]

    @property
    def denoiser(self) -> Component:
        return next(c for n, c in self.components.items() if n in DENOISERS)

    @property
    def text_encoders(self) -> list[Component]:
        return [self.components[n] for n in TEXT_ENCODERS if n in self.components]

    @property
    def vae(self) -> Component:
        return self.components["vae"]

    @property
    def clip_tokens(self) -> int:
        """Tokens a CLIP prompt is padded to: the first text encoder's context (77 for every released CLIP)."""
        return int(self.text_encoders[0].config.get("max_position_embeddings", CLIP_TOKENS))

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.get("block_out_channels", [0] * 4)) - 1)

    def latent(self, resolution: int | None = None) -> tuple[int, int]:
        """(latent channels, latent side) at `resolution` pixels (default the arch's)."""
        r = int(resolution or self.resolution)
        if r % (self.vae_factor * 2):
            raise UserError(f"resolution {r} must be a multiple of {self.vae_factor * 2} for {self.title}")
        return int(self.vae.config.get("latent_channels", 4)), r // self.vae_factor

    def with_(self, **changes) -> Arch:
        return dataclasses.replace(self, **changes)


def arch_names() -> list[str]:
    return sorted(p.stem for p in ARCHS_DIR.glob("*.json"))


@functools.cache
def load_arch(name: str) -> Arch:
    """A shipped arch by name (bench/archs/NAME.json); UserError naming the known ones otherwise."""
    path = ARCHS_DIR / f"{name}.json"
    if not path.is_file():
        raise unknown("architecture", name, arch_names())
    raw = json.loads(path.read_text(encoding="utf-8"))
    comps = {n: Component(n, c["config"], c.get("published")) for n, c in raw["components"].items()}
    return Arch(raw["name"], raw["title"], raw["source"], raw["pipeline"], raw["resolution"], raw["guidance"], comps,
                raw.get("max_sequence_length"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: a diffusers directory has one config.json per component") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def arch_from_directory(path: Path | str, resolution: int | None = None, max_sequence_length: int | None = None) -> Arch:
    """The arch of a local diffusers directory, from its model_index.json and components' config.json only.

    Defaults as the backbones load them: resolution = the denoiser's sample_size × the VAE factor (FLUX: 1024);
    T5 tokens = 256 (SD3), 512 (FLUX with a guidance embedding) or 256 (without). UserError (one line) for a
    missing or unreadable config, or a pipeline flashbench does not load.
    """
    root = Path(path)
    index = _read_json(root / "model_index.json")
    pipeline = index.get("_class_name")
    if pipeline not in LAYOUTS:
        raise UserError(f"{root}: model_index.json names {pipeline!r}; flashbench plans {', '.join(LAYOUTS)}")
    names = [n for n in (*DENOISERS, *TEXT_ENCODERS, "vae") if (root / n / "config.json").is_file()]
    comps = {n: Component(n, _read_json(root / n / "config.json")) for n in names}
    missing = [n for n in ("vae",) if n not in comps] + ([] if any(n in comps for n in DENOISERS) else ["unet or transformer"])
    if missing or not any(n in comps for n in TEXT_ENCODERS):
        raise UserError(f"{root}: no config.json for {', '.join(missing) or 'any text encoder'}; a {pipeline} "
                        "directory has unet/ or transformer/, text_encoder*/ and vae/")
    layout = LAYOUTS[pipeline]
    den = comps["unet"] if "unet" in comps else comps["transformer"]
    factor = 2 ** (len(comps["vae"].config.get("block_out_channels", [0] * 4)) - 1)
    default_res = 128 * factor if layout == "flux" else int(den.config.get("sample_size", 64)) * factor
    seq = None
    if layout == "sd3":
        seq = 256
    elif layout == "flux":
        seq = 512 if den.config.get("guidance_embeds") else 256
    guidance = "embedded" if den.config.get("guidance_embeds") else "cfg"
    return Arch(root.name, f"{pipeline} in {root}", str(root), pipeline, int(resolution or default_res), guidance, comps,
                int(max_sequence_length or seq) if seq else None)


# --- building on the meta device ------------------------------------------------------------------------------------


def build(component: Component, dtype: torch.dtype = torch.float32, device: str | torch.device = "meta") -> torch.nn.Module:
    """The component's network in `dtype`, frozen: on the meta device (no weights, no initialisation work), or on a
    real `device` with random weights initialised there in `dtype` (the GPU check's real-sized stand-ins)."""
    import diffusers
    import transformers

    name = component.class_name
    cfg = {k: v for k, v in component.config.items() if not k.startswith("_")}
    default = torch.get_default_dtype()
    if str(device) != "meta":
        torch.set_default_dtype(dtype)  # initialised in `dtype` where it is made: no fp32 copy of billions of weights
    try:
        net = _construct(component, name, cfg, device, diffusers, transformers)
    finally:
        torch.set_default_dtype(default)
    return net.to(dtype).eval().requires_grad_(False)


def _construct(component: Component, name: str, cfg: dict, device, diffusers, transformers) -> torch.nn.Module:
    with torch.device(device):
        if "_class_name" in component.config:
            cls = getattr(diffusers, name, None)
            if cls is None:
                raise UserError(f"{component.name}: diffusers has no class {name!r}")
            net = cls.from_config(cfg)
        else:
            cls = getattr(transformers, name, None)
            if cls is None:
                raise UserError(f"{component.name}: transformers has no class {name!r}")
            net = cls(cls.config_class.from_dict(cfg))
    return net


def param_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def lora_param_count(net: torch.nn.Module, rank: int) -> int:
    """Parameters of rank-`rank` LoRA adapters on every to_q / to_k / to_v / to_out.0 Linear (``methods.student``'s
    targets): rank · (in + out) each."""
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    return sum(rank * (m.in_features + m.out_features) for n, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(targets))


def add_lora(net: torch.nn.Module, rank: int) -> None:
    """``methods.student.add_lora`` on a meta network: peft adapters on the attention projections, only they train."""
    from peft import LoraConfig

    net.requires_grad_(False)
    with torch.device("meta"):
        net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for n, p in net.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)


# --- one forward each, inputs created inside (counted) ---------------------------------------------------------------


def _meta(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="meta", dtype=dtype)


def _param_dtype(net: torch.nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


def denoiser_call(arch: Arch, net: torch.nn.Module, batch: int, resolution: int | None = None,
                  x: torch.Tensor | None = None) -> torch.Tensor:
    """One denoiser evaluation at `batch` as ``methods.sampling.Denoiser.raw`` makes it: inputs in the network's
    dtype, output float32 [batch, C, h, w]. `x`: the latents (e.g. requiring grad), else fresh ones."""
    dt = _param_dtype(net)
    c, s = arch.latent(resolution)
    x = (_meta(batch, c, s, s) if x is None else x).to(dt)
    cfg = arch.denoiser.config
    if arch.layout == "unet":
        t = torch.full((batch,), 999, device="meta", dtype=torch.long)
        states = _meta(batch, arch.clip_tokens, cfg["cross_attention_dim"], dtype=dt)
        added = None
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            added = {"text_embeds": _meta(batch, pooled, dtype=dt), "time_ids": _meta(batch, 6, dtype=dt)}
        return net(x, t, encoder_hidden_states=states, added_cond_kwargs=added).sample.float()
    t = torch.full((batch,), 500.0, device="meta", dtype=dt)
    seq = int(arch.max_sequence_length or 256)
    if arch.layout == "sd3":
        states = _meta(batch, arch.clip_tokens + seq, cfg["joint_attention_dim"], dtype=dt)
        pooled = _meta(batch, cfg["pooled_projection_dim"], dtype=dt)
        return net(hidden_states=x, timestep=t, encoder_hidden_states=states, pooled_projections=pooled,
                   return_dict=False)[0].float()
    # FLUX: 2×2 patches packed into tokens, as FluxPipeline._pack_latents / _prepare_latent_image_ids
    h2 = s // 2
    tokens = x.view(batch, c, h2, 2, h2, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, h2 * h2, c * 4)
    img_ids = torch.zeros(h2 * h2, 3, device="meta", dtype=dt)
    txt_ids = torch.zeros(seq, 3, device="meta", dtype=dt)
    guidance = torch.full((batch,), 3.5, device="meta") if cfg.get("guidance_embeds") else None
    out = net(hidden_states=tokens, timestep=t / 1000, guidance=guidance, encoder_hidden_states=_meta(
        batch, seq, cfg["joint_attention_dim"], dtype=dt), pooled_projections=_meta(batch, cfg["pooled_projection_dim"],
                                                                                   dtype=dt),
              txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return out.view(batch, h2, h2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(batch, c, s, s).float()


def text_call(arch: Arch, component: Component, net: torch.nn.Module, batch: int) -> torch.Tensor:
    """One text encoder on `batch` prompts: CLIP at its context (77 tokens) with every hidden state kept (the backbones
    read the penultimate one), T5 at the arch's max_sequence_length."""
    if component.class_name.startswith("T5"):
        ids = torch.zeros(batch, int(arch.max_sequence_length or 256), device="meta", dtype=torch.long)
        return net(ids).last_hidden_state
    ids = torch.zeros(batch, int(component.config.get("max_position_embeddings", CLIP_TOKENS)), device="meta",
                      dtype=torch.long)
    return net(ids, output_hidden_states=True).hidden_states[-2]


def vae_modes(vae: torch.nn.Module, slicing: bool, tiling: bool) -> None:
    """diffusers' AutoencoderKL slicing (one sample at a time) and tiling (its own tile: the config's sample_size,
    25 % overlap) switched on or off, as ``[backbone] vae_slicing / vae_tiling`` (enable_slicing / enable_tiling)."""
    vae.use_slicing, vae.use_tiling = slicing, tiling


def decode_call(arch: Arch, vae: torch.nn.Module, batch: int, resolution: int | None = None) -> torch.Tensor:
    """``methods.backbones.directory.decode_latents``: latents [B, C, h, w] -> float32 images in [0, 1]."""
    c, s = arch.latent(resolution)
    z = _meta(batch, c, s, s)
    img = vae.decode(z.to(_param_dtype(vae))).sample
    return ((img.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def encode_call(arch: Arch, vae: torch.nn.Module, batch: int, resolution: int | None = None) -> torch.Tensor:
    """``methods.backbones.directory.encode_images``: float32 images [B, 3, R, R] -> latents (the posterior mean)."""
    r = int(resolution or arch.resolution)
    x = (_meta(batch, 3, r, r) * 2.0 - 1.0).to(_param_dtype(vae))
    return vae.encode(x).latent_dist.mean.float()
