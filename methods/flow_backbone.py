"""Real-scale rectified-flow teachers: SD3 / SD3.5 and FLUX.1 from a local diffusers directory.

The transformer (``SD3Transformer2DModel`` or ``FluxTransformer2DModel``), VAE, text encoders and tokenizers and
the scheduler config are loaded with ``local_files_only=True`` and safetensors only, as ``DiffusersBackbone``
loads SD/SDXL (same variant resolution and sha256 identity of exactly the files loaded). Behind the Backbone
interface the model space is the VAE's latent [C, H, W] (FLUX: unpacked; the 2×2 packing into tokens happens
inside the network wrapper), the prediction is the flow velocity u = ε − x0 (``prediction_type = "flow"``) and
the schedule a ``FlowSchedule`` with the directory's shift (FLUX: ``mu`` from the image token count when its
scheduler uses dynamic shifting, and FluxPipeline's σ = linspace(1, 1/steps, steps) grid).

Methods see ``backbone.unet``: a ``FlowNet`` presenting the UNet call ``net(x, t, encoder_hidden_states=...,
added_cond_kwargs={"pooled": ...}[, guidance=...][, timestep_cond=...]) -> .sample`` with t the continuous
timestep σ·1000, as the methods use it. Text is encoded by the pipelines' own ``encode_prompt``
(StableDiffusion3Pipeline, FluxPipeline), so the conditioning is the pipeline's by construction.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from methods.backbone import Cond
from methods.diffusers_backbone import (DTYPES, DirectoryBackbone, decode_latents, encode_images, pipeline_files,
                                        real_training_batch, resolve_variant)
from methods.diffusion import T_TRAIN, FlowSchedule, flow_shift_mu

LAYOUTS = ("sd3", "flux")
# the pipeline class names of model_index.json this module loads, and the ones it names as not supported yet
PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
FLUX_MAX_SEQUENCE_LENGTH = {"schnell": 256, "dev": 512}  # T5 tokens, as the model cards use them
SD3_MAX_SEQUENCE_LENGTH = 256
DEFAULT_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default (guidance-embedded FLUX.1-dev)
MAX_FEATURE_BLOCKS = 4  # discriminator feature levels taken from the joint transformer blocks


def layout_of(path: Path) -> str | None:
    """"sd3" or "flux" for a diffusers directory of those pipelines, None for a UNet (SD/SDXL) layout.

    Raises UserError (one line) for a transformer layout this module does not load (e.g. SANA, Qwen-Image).
    """
    index = Path(path) / "model_index.json"
    name = None
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError:
            raise UserError(f"{index}: not valid JSON") from None
    if name in PIPELINES:
        return PIPELINES[name]
    if (Path(path) / "transformer").is_dir():
        raise UserError(f"{path}: a {name or 'transformer'} pipeline is not supported yet (flashbench loads "
                        f"{', '.join(PIPELINES)} transformers and SD/SDXL UNets)")
    return None


@dataclasses.dataclass(frozen=True)
class FlowNetConfig:
    """What methods read from ``unet.config``: the model space and the LCM-style w-embedding width."""

    in_channels: int  # latent channels C of the model space (FLUX: before packing)
    sample_size: int  # latent height = width
    time_cond_proj_dim: int | None = None


class FlowNet(nn.Module):
    """A flow transformer behind the UNet call the methods use.

    ``forward(x [B, C, H, W], t [B] float (σ·1000), encoder_hidden_states [B, L, D], added_cond_kwargs={"pooled":
    [B, P]}, guidance=None | float32 [B], timestep_cond=None | [B, w_dim])`` returns an object whose ``.sample``
    is the velocity [B, C, H, W]. SD3 gets t as StableDiffusion3Pipeline passes it; FLUX gets the latents packed
    into 2×2 tokens with their img_ids / txt_ids and t/1000, as FluxPipeline (diffusers' own pack/unpack).
    A guidance-embedded FLUX transformer called without ``guidance`` gets ``default_guidance``. With
    ``time_cond_proj_dim`` a zero-initialised projection of ``timestep_cond`` is added to the transformer's
    timestep embedding (LCM's w-embedding; ``cond_proj``), so the copy starts as the teacher.
    """

    def __init__(self, transformer: nn.Module, layout: str, sample_size: int, in_channels: int,
                 time_cond_proj_dim: int | None = None, default_guidance: float = DEFAULT_EMBEDDED_GUIDANCE):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.transformer, self.layout, self.default_guidance = transformer, layout, default_guidance
        self.config = FlowNetConfig(in_channels, sample_size, time_cond_proj_dim)
        self.cond_proj = None
        self._w = None
        if time_cond_proj_dim:
            tc = transformer.config
            self.cond_proj = nn.Linear(time_cond_proj_dim, tc.num_attention_heads * tc.attention_head_dim)
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)
            transformer.time_text_embed.register_forward_hook(self._add_w)

    def _add_w(self, module, args, temb):
        return temb if self._w is None else temb + self.cond_proj(self._w.to(temb.dtype))

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def patch(self) -> int:
        """Latent pixels per token side (FLUX packs 2×2; SD3's patch_size)."""
        return 2 if self.layout == "flux" else int(self.transformer.config.patch_size)

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, guidance=None, timestep_cond=None):
        from diffusers import FluxPipeline
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        b, c, h, w = x.shape
        t = torch.as_tensor(t, device=x.device)
        t = (t.expand(b) if t.ndim == 0 else t).to(x.dtype)
        pooled = (added_cond_kwargs or {}).get("pooled")
        self._w = timestep_cond
        try:
            if self.layout == "sd3":
                out = self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states,
                                       pooled_projections=pooled, return_dict=False)[0]
                return Transformer2DModelOutput(sample=out)
            if guidance is None and self.guidance_embeds:
                guidance = torch.full((b,), self.default_guidance, dtype=torch.float32, device=x.device)
            if not self.guidance_embeds:
                guidance = None
            tokens = FluxPipeline._pack_latents(x, b, c, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
            out = self.transformer(hidden_states=tokens, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                                   encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids,
                                   return_dict=False)[0]
            return Transformer2DModelOutput(sample=FluxPipeline._unpack_latents(out, h, w, 1))
        finally:
            self._w = None

    def encoder_features(self, x_t, t, cond: Cond, timestep_cond=None) -> list[torch.Tensor]:
        """Image-token hidden states [B, D, H/p, W/p] after up to MAX_FEATURE_BLOCKS evenly spaced joint
        transformer blocks (the teacher features of the adversarial term; LADD takes MMDiT token features)."""
        blocks = self.transformer.transformer_blocks
        k = min(MAX_FEATURE_BLOCKS, len(blocks))
        picks = sorted({round((i + 1) * len(blocks) / k) - 1 for i in range(k)})
        feats, hooks = [], []
        for i in picks:
            hooks.append(blocks[i].register_forward_hook(lambda m, a, out: feats.append(out[1])))
        try:
            self(x_t, t, encoder_hidden_states=cond.states, added_cond_kwargs=cond.added, timestep_cond=timestep_cond)
        finally:
            for hk in hooks:
                hk.remove()
        hp, wp = x_t.shape[2] // self.patch, x_t.shape[3] // self.patch
        return [f.transpose(1, 2).reshape(f.shape[0], f.shape[2], hp, wp) for f in feats]

    # peft / gradient checkpointing act on the transformer (students' LoRA adapters, as methods.student)
    def add_adapter(self, config, adapter_name: str = "default") -> None:
        self.transformer.add_adapter(config, adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        self.transformer.fuse_lora(lora_scale=lora_scale)


class FlowDiffusersBackbone(DirectoryBackbone):
    """An SD3/SD3.5 or FLUX.1 diffusers directory behind the Backbone interface (latent space, flow prediction)."""

    prediction_type = "flow"

    def __init__(self, path: Path, device: str | torch.device = "cpu", dtype: str = "fp32",
                 variant: str | None = None, resolution: int | None = None, max_sequence_length: int | None = None,
                 embedded_guidance: float = DEFAULT_EMBEDDED_GUIDANCE):
        """`dtype`: fp32, bf16 or fp16 for the transformer and text encoders (VAE likewise); `resolution`: image
        side in pixels (default: SD3's transformer sample_size, FLUX 1024, times the VAE factor); `max_sequence_length`:
        T5 tokens (default SD3 256, FLUX.1-dev 512, FLUX.1-schnell-like (no guidance embedding) 256);
        `embedded_guidance`: the guidance embedding's scale when a method does not set it (FLUX.1-dev, as FluxPipeline's
        default). Raises UserError (one line) for a missing component, weights or an unsupported layout."""
        import diffusers
        from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                                  T5TokenizerFast)

        self.path = Path(path)
        self.layout = layout_of(self.path)
        if self.layout is None:
            raise UserError(f"{path} is not an SD3 or FLUX diffusers directory (model_index.json _class_name "
                            f"{' or '.join(PIPELINES)})")
        flux = self.layout == "flux"
        self.encoder_names = ["text_encoder", "text_encoder_2"] + ([] if flux else ["text_encoder_3"])
        components = ["transformer", "vae", *self.encoder_names]
        missing = [c for c in [*components, "scheduler"] if not (self.path / c).is_dir()]
        if missing:
            raise UserError(f"{path}: the {self.layout.upper()} layout needs {', '.join(missing)}/")
        if dtype not in DTYPES:
            raise UserError(f"[backbone] dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.variant = resolve_variant(self.path, components, variant)
        self.device = torch.device(device)
        kw = {"local_files_only": True, "use_safetensors": True, "variant": self.variant, "torch_dtype": self.dtype}
        enc_classes = [CLIPTextModel, T5EncoderModel] if flux else [CLIPTextModelWithProjection] * 2 + [T5EncoderModel]
        tok_classes = [CLIPTokenizer, T5TokenizerFast] if flux else [CLIPTokenizer] * 2 + [T5TokenizerFast]
        tf_class = diffusers.FluxTransformer2DModel if flux else diffusers.SD3Transformer2DModel
        try:
            self.transformer = tf_class.from_pretrained(self.path, subfolder="transformer", **kw)
            self.vae = diffusers.AutoencoderKL.from_pretrained(self.path, subfolder="vae", **kw)
            self.text_encoders = [cls.from_pretrained(self.path, subfolder=n, **kw)
                                  for cls, n in zip(enc_classes, self.encoder_names)]
            self.tokenizers = [cls.from_pretrained(self.path, subfolder=n.replace("text_encoder", "tokenizer"),
                                                   local_files_only=True)
                               for cls, n in zip(tok_classes, self.encoder_names)]
            sched = json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load the {self.layout.upper()} pipeline in {self.path}: {msg}") from None
        for m in [self.transformer, self.vae, *self.text_encoders]:
            m.to(self.device).eval().requires_grad_(False)
        self.scheduler_config = {k: v for k, v in sched.items() if not k.startswith("_")}
        if "shift" not in self.scheduler_config:
            self.scheduler_config["shift"] = 1.0  # FlowMatchEulerDiscreteScheduler's default; marks a flow config
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        default_latent = int(self.transformer.config.sample_size) if not flux else 128
        self.resolution = int(resolution or default_latent * self.vae_factor)
        self.latent_size = self.resolution // self.vae_factor
        patch = 2 if flux else int(self.transformer.config.patch_size)
        if self.resolution % self.vae_factor or self.latent_size % patch:
            raise UserError(f"[backbone] resolution {self.resolution} must be a multiple of {self.vae_factor * patch} "
                            f"for this {self.layout.upper()} pipeline")
        self.guidance_embeds = bool(getattr(self.transformer.config, "guidance_embeds", False))
        if max_sequence_length is None:
            max_sequence_length = (FLUX_MAX_SEQUENCE_LENGTH["dev" if self.guidance_embeds else "schnell"] if flux
                                   else SD3_MAX_SEQUENCE_LENGTH)
        self.max_sequence_length = int(max_sequence_length)
        self.embedded_guidance = float(embedded_guidance)
        self.schedule = self.schedule_for(self.scheduler_config)
        self.scaling = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.unet = self.wrap(self.transformer)
        self.train_data = None
        self._pipe = self._pipeline()
        self._identity = self._hash_components(components)
        self._identity.update(dtype=dtype, max_sequence_length=self.max_sequence_length,
                              embedded_guidance=self.embedded_guidance if self.guidance_embeds else None)

    def schedule_for(self, cfg: dict) -> FlowSchedule:
        """FlowSchedule(shift) from a scheduler config (this directory's, or a checkpoint's); with dynamic shifting mu
        for this resolution's token count (diffusers' calculate_shift, as both pipelines compute it); FLUX samples on
        FluxPipeline's linear σ grid."""
        mu = None
        if cfg.get("use_dynamic_shifting"):
            patch = 2 if self.layout == "flux" else int(self.transformer.config.patch_size)
            seq = (self.latent_size // patch) ** 2
            mu = flow_shift_mu(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return FlowSchedule(shift=float(cfg.get("shift", 1.0)), mu=mu, T=int(cfg.get("num_train_timesteps", T_TRAIN)),
                            linear_sigmas=self.layout == "flux")

    def wrap(self, transformer, time_cond_proj_dim: int | None = None) -> FlowNet:
        """`transformer` (this layout's class) behind the UNet call the methods use."""
        return FlowNet(transformer, self.layout, self.latent_size, self.latent_channels, time_cond_proj_dim,
                       self.embedded_guidance)

    def _pipeline(self):
        """The diffusers pipeline over these very modules (its encode_prompt conditions the network)."""
        import diffusers

        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        parts = dict(transformer=self.transformer, vae=self.vae, scheduler=sched)
        for n, enc, tok in zip(self.encoder_names, self.text_encoders, self.tokenizers):
            parts[n], parts[n.replace("text_encoder", "tokenizer")] = enc, tok
        cls = diffusers.FluxPipeline if self.layout == "flux" else diffusers.StableDiffusion3Pipeline
        pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self, transformer=None, scheduler=None):
        """A diffusers pipeline sharing this backbone's modules (a `transformer` or `scheduler` replaced): what a
        user would run instead of flashbench (parity tests, recipes)."""
        parts = dict(self._pipe.components)
        if transformer is not None:
            parts["transformer"] = transformer
        if scheduler is not None:
            parts["scheduler"] = scheduler
        pipe = type(self._pipe)(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _hash_components(self, components: list[str]) -> dict:
        """The identity: ``pipeline_files`` of the components loaded, and their combined sha256."""
        files = pipeline_files(self.path, components, self.encoder_names, self.variant)
        combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        return {"backbone": "diffusers", "layout": self.layout, "name": self.path.name, "variant": self.variant,
                "resolution": self.resolution, "prediction_type": self.prediction_type, "sha256": combined,
                "files": files}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    def new_unet(self, time_cond_proj_dim: int | None = None) -> nn.Module:
        """A trainable FlowNet over a copy of the transformer (optionally with a zero-initialised w-embedding).

        A deep copy (same dtype and device, no random initialisation of billions of weights first)."""
        tf = copy.deepcopy(self.transformer).requires_grad_(True)
        return self.wrap(tf, time_cond_proj_dim).to(self.device)

    def truncated(self, texts: list[str]) -> dict[str, list[int]]:
        out = {}
        for name, tok in zip(self.encoder_names, self.tokenizers):
            limit = self.max_sequence_length if "T5" in type(tok).__name__ else tok.model_max_length
            lengths = [len(ids) for ids in tok(texts, padding=False, truncation=False)["input_ids"]]
            out[name] = [i for i, n in enumerate(lengths) if n > limit]
        return out

    @torch.no_grad()
    def encode_text(self, texts: list[str], micro: torch.Tensor | None = None,
                    max_sequence_length: int | None = None) -> Cond:
        """The pipeline's encode_prompt: states [B, L, D] (SD3: CLIP-L/G penultimate states padded to T5's width,
        then T5; FLUX: T5; L counts T5's `max_sequence_length` tokens, default the backbone's) and added
        {"pooled": [B, P]} (SD3: both CLIP pooled projections; FLUX: CLIP-L pooled). The empty prompt is encoded
        as a prompt, as both pipelines encode their negative prompt. `micro` is unused (no micro-conditioning)."""
        seq = int(max_sequence_length or self.max_sequence_length)
        if self.layout == "flux":
            states, pooled, _ = self._pipe.encode_prompt(prompt=list(texts), prompt_2=None, device=self.device,
                                                         max_sequence_length=seq)
        else:
            states, _, pooled, _ = self._pipe.encode_prompt(prompt=list(texts), prompt_2=None, prompt_3=None,
                                                            device=self.device, do_classifier_free_guidance=False,
                                                            max_sequence_length=seq)
        return Cond(states, {"pooled": pooled})

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, H, W] -> images [B, 3, R, R] in [0, 1]: decode(x0 / scaling + shift), as both pipelines."""
        return decode_latents(self.vae, x0, self.scaling, self.shift_factor)

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode_images(self.vae, images.to(self.device), self.scaling, self.shift_factor)

    def training_batch(self, n: int, key: int):
        return real_training_batch(self.train_data, n, key, self.device, "flow", micro=False)




