"""What the rectified-flow transformer families (SD3/SD3.5, FLUX.1) share.

The transformer, VAE, text encoders and tokenizers and the scheduler config load as every directory family's
(``methods.backbones.directory``). Behind the Backbone interface the model space is the VAE's latent [C, H, W]
(FLUX: unpacked; the 2×2 packing into tokens happens inside its network wrapper), the prediction is the flow
velocity u = ε − x0 (``prediction_type = "flow"``) and the schedule a ``FlowSchedule`` with the directory's shift
(``mu`` from the image token count when its scheduler uses dynamic shifting).

Methods see ``backbone.net``: a ``FlowNet`` presenting the UNet call ``net(x, t, encoder_hidden_states=...,
added_cond_kwargs={"pooled": ...}[, guidance=...][, timestep_cond=...]) -> .sample`` with t the continuous
timestep σ·1000, as the methods use it. Text is encoded by the pipelines' own ``encode_prompt``, so the
conditioning is the pipeline's by construction.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar

import torch
from torch import nn

from methods.backbone import COMPILE_MARK, Cond
from methods.backbones.directory import DirectoryBackbone, DirectorySettings
from methods.diffusion import T_TRAIN, FlowSchedule, flow_shift_mu

MAX_FEATURE_BLOCKS = 4  # discriminator feature levels taken from the joint transformer blocks


@dataclasses.dataclass
class FlowSettings(DirectorySettings):
    """``[backbone]`` settings of the flow-transformer families."""

    max_sequence_length: int | None = None  # T5 tokens; None: the family's convention

    def __post_init__(self):
        super().__post_init__()
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive number of T5 tokens, got {self.max_sequence_length}")


@dataclasses.dataclass(frozen=True)
class FlowNetConfig:
    """What methods read from ``net.config``: the model space and the LCM-style w-embedding width."""

    in_channels: int  # latent channels C of the model space (FLUX: before packing)
    sample_size: int  # latent height = width
    time_cond_proj_dim: int | None = None


class FlowNet(nn.Module):
    """A flow transformer behind the UNet call the methods use (families subclass ``call``).

    ``forward(x [B, C, H, W], t [B] float (σ·1000), encoder_hidden_states [B, L, D], added_cond_kwargs={"pooled":
    [B, P]}, guidance=None | float32 [B], timestep_cond=None | [B, w_dim])`` returns an object whose ``.sample`` is
    the velocity [B, C, H, W]. With ``time_cond_proj_dim`` a zero-initialised projection of ``timestep_cond`` is added
    to the transformer's timestep embedding (LCM's w-embedding; ``cond_proj``), so the copy starts as the teacher.
    """

    patch_size: ClassVar[int | None] = None  # latent pixels per token side (None: the transformer's patch_size)

    def __init__(self, transformer: nn.Module, sample_size: int, in_channels: int,
                 time_cond_proj_dim: int | None = None, default_guidance: float | None = None):
        super().__init__()
        self.transformer, self.default_guidance = transformer, default_guidance
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
        return self.patch_size or int(self.transformer.config.patch_size)

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, guidance=None, timestep_cond=None):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        t = torch.as_tensor(t, device=x.device)
        t = (t.expand(x.shape[0]) if t.ndim == 0 else t).to(x.dtype)
        pooled = (added_cond_kwargs or {}).get("pooled")
        self._w = timestep_cond
        try:
            return Transformer2DModelOutput(sample=self.call(x, t, encoder_hidden_states, pooled, guidance))
        finally:
            self._w = None

    def call(self, x, t, states, pooled, guidance) -> torch.Tensor:
        """The velocity [B, C, H, W] from the transformer, called as the family's pipeline calls it."""
        raise NotImplementedError

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


class FlowBackbone(DirectoryBackbone):
    """A flow-transformer directory behind the Backbone interface (latent space, flow prediction). Families set
    ``Net`` (their FlowNet), ``pipeline_name``, their encoder/tokenizer classes and how the pipeline encodes."""

    Settings = FlowSettings
    denoiser = "transformer"
    prediction_type = "flow"
    Net: ClassVar[type[FlowNet]]
    pipeline_name: ClassVar[str]  # the diffusers pipeline class whose encode_prompt conditions the network
    transformer_name: ClassVar[str]
    encoder_classes: ClassVar[tuple[str, ...]]  # transformers classes of text_encoder, text_encoder_2, ...
    tokenizer_classes: ClassVar[tuple[str, ...]]
    linear_sigmas: ClassVar[bool] = False  # sample on σ = linspace(1, 1/N, N) then shift (FluxPipeline's grid)

    def load_components(self, kw: dict) -> None:
        import diffusers
        import transformers

        self.transformer = getattr(diffusers, self.transformer_name).from_pretrained(self.path, subfolder="transformer",
                                                                                     **kw)
        if self.vae_path is None:
            self.vae = diffusers.AutoencoderKL.from_pretrained(self.path, subfolder="vae", **kw)
        self.text_encoders = [getattr(transformers, c).from_pretrained(self.path, subfolder=n, **kw)
                              for c, n in zip(self.encoder_classes, self.encoder_names)]
        self.tokenizers = [getattr(transformers, c).from_pretrained(self.path, local_files_only=True,
                                                                   subfolder=n.replace("text_encoder", "tokenizer"))
                           for c, n in zip(self.tokenizer_classes, self.encoder_names)]
        self.net = self.transformer  # placed by DirectoryBackbone; wrapped in setup

    def default_max_sequence_length(self) -> int:
        raise NotImplementedError

    def default_guidance(self) -> float | None:
        """The scale a guidance-embedded network gets when a method does not give one (None: no embedding)."""
        return None

    def setup(self) -> None:
        if "shift" not in self.scheduler_config:
            self.scheduler_config["shift"] = 1.0  # FlowMatchEulerDiscreteScheduler's default; marks a flow config
        self.guidance_embeds = bool(getattr(self.transformer.config, "guidance_embeds", False))
        self.max_sequence_length = int(self.settings.max_sequence_length or self.default_max_sequence_length())
        self.schedule = self.schedule_for(self.scheduler_config)
        self.net = self.wrap(self.transformer)
        self._pipe = self._pipeline()

    def identity_extra(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def resolution_changed(self) -> None:
        self.schedule = self.schedule_for(self.scheduler_config)

    @property
    def patch(self) -> int:
        return self.Net.patch_size or int(self.transformer.config.patch_size)

    def default_resolution(self) -> int:
        return int(self.transformer.config.sample_size) * self.vae_factor

    def schedule_for(self, cfg: dict) -> FlowSchedule:
        """FlowSchedule(shift) from a scheduler config (this directory's, or a checkpoint's); with dynamic shifting mu
        for this resolution's token count (diffusers' calculate_shift, as both pipelines compute it)."""
        mu = None
        if cfg.get("use_dynamic_shifting"):
            seq = (self.latent_size // self.patch) ** 2
            mu = flow_shift_mu(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return FlowSchedule(shift=float(cfg.get("shift", 1.0)), mu=mu, T=int(cfg.get("num_train_timesteps", T_TRAIN)),
                            linear_sigmas=self.linear_sigmas)

    def wrap(self, transformer, time_cond_proj_dim: int | None = None) -> FlowNet:
        """`transformer` (this family's class) behind the UNet call the methods use."""
        return self.Net(transformer, self.latent_size, self.latent_channels, time_cond_proj_dim,
                        self.default_guidance())

    def _pipeline(self):
        """The diffusers pipeline over these very modules (its encode_prompt conditions the network)."""
        import diffusers

        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        parts = dict(transformer=self.transformer, vae=self.vae, scheduler=sched)
        for n, enc, tok in zip(self.encoder_names, self.text_encoders, self.tokenizers):
            parts[n], parts[n.replace("text_encoder", "tokenizer")] = enc, tok
        pipe = getattr(diffusers, self.pipeline_name)(**parts)
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

    def new_net(self, time_cond_proj_dim: int | None = None) -> nn.Module:
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

    def encode_prompt(self, texts: list[str], max_sequence_length: int):
        """(states [B, L, D], pooled [B, P]) from the pipeline's encode_prompt."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_text(self, texts: list[str], micro: torch.Tensor | None = None,
                    max_sequence_length: int | None = None) -> Cond:
        """The pipeline's encode_prompt: states [B, L, D] (L counts T5's `max_sequence_length` tokens, default the
        backbone's) and added {"pooled": [B, P]}. The empty prompt is encoded as a prompt, as both pipelines encode
        their negative prompt. `micro` is unused (no micro-conditioning)."""
        with self.on_device(*self.text_encoders):
            states, pooled = self.encode_prompt(list(texts), int(max_sequence_length or self.max_sequence_length))
        return Cond(states.to(self.device), {"pooled": pooled.to(self.device)})

    def prepare_net(self, net: nn.Module) -> nn.Module:
        """As every family's, compiling the transformer inside a FlowNet (the wrapper's packing stays eager)."""
        if isinstance(net, FlowNet) and self.settings.compile:
            super().prepare_net(net.transformer)
            setattr(net, COMPILE_MARK, self.settings.compile)
            return net
        return super().prepare_net(net)
