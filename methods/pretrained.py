"""Published distilled checkpoints, loaded from local paths and measured under the bench's protocol.

A checkpoint is a diffusers UNet directory or a LoRA file for the backbone's UNet, plus the way its
authors sample it: scheduler, timestep spacing (or explicit timesteps), output parameterisation
(``prediction_type``: epsilon, v_prediction or sample = x̂_0) and guidance (none: 1 NFE per step;
cfg: classifier-free guidance at ``guidance_scale``, 2 NFE; embedded: LCM's guidance embedding with
w = guidance_scale − 1, 1 NFE). ``recipe`` fills these from RECIPES (the model cards' settings);
anything given explicitly wins. Text encoder, VAE and noise schedule are the backbone's.

On a rectified-flow backbone (SD3, FLUX.1: ``methods.backbones.flow``) a checkpoint is a diffusers transformer
directory (kind ``transformer``) or a LoRA file for the transformer, sampled with FlowMatchEulerDiscreteScheduler
(``flow-euler``) on the backbone's schedule, with the checkpoint's own ``shift`` / ``dynamic_shifting`` (FLUX.1-schnell
ships shift 1 without dynamic shifting), T5 ``max_sequence_length`` and LoRA fusing scale (``lora_scale``);
"embedded" guidance there is FLUX's guidance embedding at ``guidance_scale`` (FluxPipeline's guidance_scale).

LoRAs are read in any common key layout (diffusers/peft, kohya ``lora_unet_…``, …) through
diffusers' own converters; after loading, every UNet key must have been injected into an adapter,
else the checkpoint is refused (a silent no-op LoRA would measure the base model). LoRAs that
also adapt the text encoders are refused (the backbone's encoders are shared by every row).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

from core.errors import UserError, unknown
from core.io import sha256_file
from methods.base import Method, TrainInfo
from methods.registry import register
from methods.sampling import (PREDICTION_TYPES, Denoiser, lcm_scheduler_config, per_sample_generators,
                              per_sample_noise, solver_sample)

KINDS = ("lcm", "lcm-lora", "turbo", "lightning", "unet", "lora", "transformer")
SCHEDULERS = ("lcm", "euler", "euler-ancestral", "ddim", "tcd", "flow-euler")
GUIDANCE = ("none", "cfg", "embedded")
STOCHASTIC = ("lcm", "euler-ancestral", "tcd")  # schedulers that draw fresh noise per step

# kind -> (scheduler, guidance) when neither a recipe nor the settings say
KIND_DEFAULTS = {"lcm": ("lcm", "embedded"), "lcm-lora": ("lcm", "none"), "turbo": ("euler-ancestral", "none"),
                 "lightning": ("euler", "none"), "unet": ("euler", "none"), "lora": ("euler", "none"),
                 "transformer": ("flow-euler", "none")}

# Published few-step checkpoints, as their model cards sample them (`path` is yours: a local copy).
RECIPES: dict[str, dict] = {
    "lcm-lora-sdv1-5": {"kind": "lcm-lora", "scheduler": "lcm", "guidance": "none", "steps": (2, 4, 8)},
    "lcm-lora-sdxl": {"kind": "lcm-lora", "scheduler": "lcm", "guidance": "none", "steps": (2, 4, 8)},
    "lcm-sdxl": {"kind": "lcm", "scheduler": "lcm", "guidance": "embedded", "guidance_scale": 8.0, "steps": (2, 4, 8)},
    "sd-turbo": {"kind": "turbo", "scheduler": "euler-ancestral", "guidance": "none", "steps": (1, 2, 4)},
    "sdxl-turbo": {"kind": "turbo", "scheduler": "euler-ancestral", "guidance": "none", "steps": (1, 2, 4)},
    "sdxl-lightning-1step": {"kind": "lightning", "scheduler": "euler", "guidance": "none", "prediction_type": "sample",
                             "steps": (1,)},
    "sdxl-lightning-2step": {"kind": "lightning", "scheduler": "euler", "guidance": "none", "steps": (2,)},
    "sdxl-lightning-4step": {"kind": "lightning", "scheduler": "euler", "guidance": "none", "steps": (4,)},
    "sdxl-lightning-8step": {"kind": "lightning", "scheduler": "euler", "guidance": "none", "steps": (8,)},
    "hyper-sdxl-1step-lora": {"kind": "lora", "scheduler": "tcd", "eta": 1.0, "guidance": "none", "steps": (1,)},
    "hyper-sdxl-2step-lora": {"kind": "lora", "scheduler": "ddim", "guidance": "none", "steps": (2,)},
    "hyper-sdxl-4step-lora": {"kind": "lora", "scheduler": "ddim", "guidance": "none", "steps": (4,)},
    "hyper-sdxl-8step-lora": {"kind": "lora", "scheduler": "ddim", "guidance": "none", "steps": (8,)},
    "hyper-sdxl-8step-cfg-lora": {"kind": "lora", "scheduler": "ddim", "guidance": "cfg", "guidance_scale": 5.0,
                                  "steps": (8,)},
    "hyper-sd15-8step-lora": {"kind": "lora", "scheduler": "ddim", "guidance": "none", "steps": (8,)},
    "tcd-sdxl-lora": {"kind": "lora", "scheduler": "tcd", "eta": 0.3, "guidance": "none", "steps": (2, 4, 8)},
    "dmd2-sdxl-4step": {"kind": "unet", "scheduler": "lcm", "guidance": "none", "timesteps": (999, 749, 499, 249),
                        "steps": (4,)},
    "dmd2-sdxl-1step": {"kind": "unet", "scheduler": "lcm", "guidance": "none", "timesteps": (399,), "steps": (1,)},
    # rectified-flow transformers (SD3 / FLUX.1 backbones): FlowMatchEulerDiscreteScheduler with the checkpoint's shift
    "flux1-schnell": {"kind": "transformer", "scheduler": "flow-euler", "guidance": "none", "shift": 1.0,
                      "dynamic_shifting": False, "max_sequence_length": 256, "steps": (1, 2, 4)},
    "sd35-large-turbo": {"kind": "transformer", "scheduler": "flow-euler", "guidance": "none", "shift": 3.0,
                         "dynamic_shifting": False, "steps": (4,)},
    "hyper-flux1-dev-8step-lora": {"kind": "lora", "scheduler": "flow-euler", "guidance": "embedded",
                                   "guidance_scale": 3.5, "lora_scale": 0.125, "steps": (8,)},
    "hyper-flux1-dev-16step-lora": {"kind": "lora", "scheduler": "flow-euler", "guidance": "embedded",
                                    "guidance_scale": 3.5, "lora_scale": 0.125, "steps": (16,)},
    "flux1-turbo-alpha-lora": {"kind": "lora", "scheduler": "flow-euler", "guidance": "embedded", "guidance_scale": 3.5,
                               "lora_scale": 1.0, "steps": (8,)},
}


@dataclasses.dataclass
class PretrainedConfig:
    path: str = ""  # a diffusers UNet directory, or a LoRA .safetensors file for the backbone's UNet
    recipe: str = ""  # a key of RECIPES: the model card's sampling settings (explicit settings win)
    kind: str | None = None  # lcm, lcm-lora, turbo, lightning (legacy names), unet or lora
    scheduler: str | None = None  # lcm, euler, euler-ancestral, ddim, tcd
    guidance: str | None = None  # none (1 NFE/step), cfg (2 NFE/step), embedded (LCM w-embedding, 1 NFE/step)
    guidance_scale: float | None = None  # CFG scale, or the embedded w + 1 (LCM's convention); default 8.0 / 0
    prediction_type: str | None = None  # the checkpoint's output: epsilon, v_prediction or sample (x̂_0)
    timestep_spacing: str = "trailing"
    timesteps: tuple[int, ...] | None = None  # explicit timesteps (one per step; DMD2's [999, 749, 499, 249])
    eta: float | None = None  # TCD's gamma
    max_steps: int = 8
    steps: tuple[int, ...] | None = None  # step counts the checkpoint was distilled for (empty: 1..max_steps)
    # flow backbones (flow-euler): the checkpoint's scheduler shift and dynamic shifting (None: the backbone's),
    # T5 tokens (None: the backbone's) and the scale its LoRA is fused at
    shift: float | None = None
    dynamic_shifting: bool | None = None
    max_sequence_length: int | None = None
    lora_scale: float | None = None

    def __post_init__(self):
        if self.recipe:
            if self.recipe not in RECIPES:
                raise unknown("checkpoint recipe", self.recipe, RECIPES)
            for k, v in RECIPES[self.recipe].items():
                if getattr(self, k) is None:
                    setattr(self, k, v)
        self.kind = self.kind or "unet"
        if self.kind not in KINDS:
            raise unknown("checkpoint kind", self.kind, KINDS)
        scheduler, guidance = KIND_DEFAULTS[self.kind]
        self.scheduler = self.scheduler or scheduler
        self.guidance = self.guidance or guidance
        if self.guidance_scale is None:
            self.guidance_scale = 8.0 if self.guidance == "embedded" else 0.0
        if self.lora_scale is None:
            self.lora_scale = 1.0
        self.steps = tuple(self.steps or ())
        self.timesteps = tuple(self.timesteps) if self.timesteps else None
        if self.scheduler not in SCHEDULERS:
            raise unknown("scheduler", self.scheduler, SCHEDULERS)
        if self.guidance not in GUIDANCE:
            raise unknown("guidance", self.guidance, GUIDANCE)
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise unknown("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timesteps and self.steps and self.steps != (len(self.timesteps),):
            raise ValueError(f"{len(self.timesteps)} explicit timesteps serve {len(self.timesteps)} steps, not {self.steps}")
        if self.timesteps and not self.steps:
            self.steps = (len(self.timesteps),)
        if not self.path:
            raise UserError(f"pretrained {self.recipe or self.kind}: give path = the local checkpoint (UNet directory "
                            "or LoRA file)")


def load_lora_strict(unet, path: Path, adapter: str = "distilled", prefix: str = "unet", loader=None) -> int:
    """Inject a LoRA file (any layout diffusers converts) into `unet`; returns the number of keys used.

    `prefix` / `loader`: the network's key prefix and the pipeline class whose ``lora_state_dict`` converts the file
    ("unet", StableDiffusionXLPipeline; a flow transformer: "transformer", FluxPipeline or StableDiffusion3Pipeline).
    Raises UserError when the file adapts the text encoders, when nothing was injected, or when some
    network keys were not used (a silent partial LoRA).
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict

    loader = loader or StableDiffusionXLPipeline
    try:
        if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:  # FLUX's returns alphas on request
            state, alphas = loader.lora_state_dict(str(path), return_alphas=True)
        else:
            out = loader.lora_state_dict(str(path))
            state, alphas = out if isinstance(out, tuple) else (out, None)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"LoRA {path.name}: cannot be read as a LoRA ({str(e).splitlines()[0][:160]})") from None
    te = [k for k in state if k.startswith(("text_encoder.", "text_encoder_2."))]
    if te:
        raise UserError(f"LoRA {path.name} also adapts the text encoders ({len(te)} keys, e.g. {te[0]}); flashbench "
                        "applies UNet LoRAs only (the encoders are shared by every row)")
    # the names the UNet's adapters will carry (diffusers' own conversion, as load_lora_adapter applies it)
    p = prefix + "."
    unet_keys = set(convert_unet_state_dict_to_peft({k[len(p):]: v for k, v in state.items() if k.startswith(p)}))
    other = [k for k in state if not k.startswith(p)]
    if not unet_keys or other:
        raise UserError(f"LoRA {path.name}: {len(other)} keys were not recognised as {prefix} LoRA weights "
                        f"(e.g. {other[0] if other else 'none'}), {len(unet_keys)} were")
    unet.load_lora_adapter(state, network_alphas=alphas, prefix=prefix, adapter_name=adapter)
    loaded = set(get_peft_model_state_dict(unet, adapter_name=adapter))
    unused = sorted(unet_keys - loaded)
    if not loaded or unused:
        raise UserError(f"LoRA {path.name}: {len(unused)} of {len(unet_keys)} {prefix} keys were not injected "
                        f"(e.g. {unused[0] if unused else '-'}); the file does not fit this backbone's {prefix}")
    return len(unet_keys)


@register("pretrained")
class Pretrained(Method):
    """Published distilled checkpoints from local paths (LCM, Turbo, Lightning, Hyper-SD, TCD, DMD2; SD3.5 Turbo, FLUX)."""

    Config = PretrainedConfig

    def __init__(self, backbone, config: PretrainedConfig, ctx):
        """Raises UserError when the checkpoint's sampler does not fit the backbone (a flow scheduler or flow settings
        on an SD/SDXL backbone, a VP scheduler on a flow transformer)."""
        super().__init__(backbone, config, ctx)
        self.denoiser = None
        self.info = None
        self.flow = _is_flow_transformer(backbone)
        flow_schedule = backbone.schedule.kind == "flow"  # an SD3/FLUX transformer, or the embedded flow UNet
        name = config.recipe or config.kind
        flow_only = [k for k in ("shift", "dynamic_shifting", "max_sequence_length") if getattr(config, k) is not None]
        if not self.flow and (config.kind == "transformer" or (flow_only and flow_schedule)):
            raise UserError(f"pretrained {name}: a rectified-flow transformer checkpoint "
                            f"({', '.join(flow_only) or config.kind}); the backbone is not an SD3/FLUX pipeline")
        if not flow_schedule and (config.scheduler == "flow-euler" or flow_only):
            raise UserError(f"pretrained {name}: a rectified-flow checkpoint ({', '.join(flow_only) or config.scheduler}); "
                            "the backbone's schedule is VP (SD/SDXL)")
        if flow_schedule and config.scheduler != "flow-euler":
            raise UserError(f"pretrained {name}: scheduler {config.scheduler!r} is for VP (SD/SDXL) schedules; on a "
                            "rectified-flow backbone use scheduler = 'flow-euler'")
        if self.flow and config.kind not in ("transformer", "lora"):
            raise UserError(f"pretrained {name}: kind {config.kind!r} is a UNet checkpoint; on a flow backbone use "
                            "kind = 'transformer' (a diffusers transformer directory) or 'lora'")

    @classmethod
    def nfe_per_step(cls, config) -> int:
        return 2 if config.guidance == "cfg" else 1

    def release(self) -> None:
        super().release()
        self.denoiser = self.info = None

    @classmethod
    def allowed_steps(cls, config) -> tuple[int, ...]:
        return tuple(config.steps) or tuple(range(1, config.max_steps + 1))

    def prepare(self, steps: int) -> TrainInfo:
        if self.denoiser is not None:
            return self.info
        from diffusers import UNet2DConditionModel

        cfg, bb = self.config, self.backbone
        path = Path(cfg.path)
        if not path.exists():
            raise UserError(f"pretrained {cfg.recipe or cfg.kind}: {path} does not exist")
        if self.flow:
            return self._prepare_flow(path)
        if path.is_dir():
            weights = sorted(path.glob("*.safetensors"))
            if not weights:
                raise UserError(f"pretrained {cfg.recipe or cfg.kind}: {path} holds no .safetensors UNet weights")
            try:
                unet = UNet2DConditionModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
            except (OSError, ValueError) as e:
                raise UserError(f"pretrained {cfg.recipe or cfg.kind}: cannot load the UNet in {path} "
                                f"({str(e).splitlines()[0][:160]})") from None
            digest = sha256_file(weights[0]) if len(weights) == 1 else None
        elif path.suffix == ".safetensors":  # LoRA on the base model's UNet
            unet = bb.new_net()
            load_lora_strict(unet, path)
            unet.fuse_lora(lora_scale=cfg.lora_scale)
            digest = sha256_file(path)
        else:
            raise UserError(f"pretrained {cfg.recipe or cfg.kind}: {path} must be a UNet directory or a .safetensors LoRA")
        unet = unet.to(bb.device).eval().requires_grad_(False)
        w_dim = unet.config.time_cond_proj_dim if cfg.guidance == "embedded" else None
        if cfg.guidance == "embedded" and not w_dim:
            raise UserError(f"pretrained {cfg.recipe or cfg.kind}: {path} has no guidance embedding "
                            "(time_cond_proj_dim); use guidance = 'none' or 'cfg'")
        self.denoiser = Denoiser(self.counted(unet), bb.schedule, cfg.prediction_type or bb.prediction_type, w_dim)
        self.info = TrainInfo(cached=True, checkpoint=path.name, checkpoint_sha256=digest)
        return self.info

    def _prepare_flow(self, path: Path) -> TrainInfo:
        """A transformer directory (or a pipeline directory holding transformer/), or a LoRA fused into a copy of the
        backbone's transformer at ``lora_scale`` (as the model cards' ``pipe.fuse_lora(lora_scale=...)``)."""
        cfg, bb = self.config, self.backbone
        name = cfg.recipe or cfg.kind
        if path.is_dir():
            folder = path / "transformer" if (path / "transformer").is_dir() else path
            weights = sorted(folder.glob("*.safetensors"))
            if not weights:
                raise UserError(f"pretrained {name}: {folder} holds no .safetensors transformer weights")
            try:
                tf = type(bb.transformer).from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                          torch_dtype=bb.dtype)
            except (OSError, ValueError) as e:
                raise UserError(f"pretrained {name}: cannot load the transformer in {folder} "
                                f"({str(e).splitlines()[0][:160]})") from None
            net = bb.wrap(tf)
            digest = sha256_file(weights[0]) if len(weights) == 1 else None
        elif path.suffix == ".safetensors":
            net = bb.new_net()
            load_lora_strict(net.transformer, path, prefix="transformer", loader=type(bb.pipeline()))
            net.transformer.fuse_lora(lora_scale=cfg.lora_scale)
            digest = sha256_file(path)
        else:
            raise UserError(f"pretrained {name}: {path} must be a transformer directory or a .safetensors LoRA")
        net = net.to(bb.device).eval().requires_grad_(False)
        if cfg.guidance == "embedded" and not net.guidance_embeds:
            raise UserError(f"pretrained {name}: {path} has no guidance embedding (FLUX.1-dev's); use guidance = "
                            "'none' or 'cfg'")
        self.denoiser = Denoiser(self.counted(net), self.schedule(), bb.prediction_type)
        self.info = TrainInfo(cached=True, checkpoint=path.name, checkpoint_sha256=digest)
        return self.info

    def flow_scheduler_config(self) -> dict:
        """The backbone's flow scheduler config with the checkpoint's shift and dynamic shifting."""
        cfg = self.config
        sc = dict(self.backbone.scheduler_config)
        if cfg.shift is not None:
            sc["shift"] = cfg.shift
        if cfg.dynamic_shifting is not None:
            sc["use_dynamic_shifting"] = cfg.dynamic_shifting
        return sc

    def schedule(self):
        """The noise schedule the checkpoint samples on: the backbone's, with a flow checkpoint's own shift."""
        return self.backbone.schedule_for(self.flow_scheduler_config()) if self.flow else self.backbone.schedule

    def scheduler(self):
        """The diffusers scheduler the checkpoint's authors sample with, on the backbone's noise schedule."""
        import diffusers

        cfg = self.config
        if cfg.scheduler == "flow-euler":
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.flow_scheduler_config())
        base = dict(self.backbone.scheduler_config, timestep_spacing=cfg.timestep_spacing)
        if cfg.prediction_type:
            base["prediction_type"] = cfg.prediction_type
        if cfg.scheduler == "lcm":
            return diffusers.LCMScheduler.from_config(lcm_scheduler_config(base))
        if cfg.scheduler == "tcd":
            return diffusers.TCDScheduler.from_config(lcm_scheduler_config(base))
        if cfg.scheduler == "ddim":
            return diffusers.DDIMScheduler.from_config(base)
        if cfg.scheduler == "euler-ancestral":
            return diffusers.EulerAncestralDiscreteScheduler.from_config(base)
        return diffusers.EulerDiscreteScheduler.from_config(base)

    @torch.no_grad()
    def sample(self, texts, noise_keys, steps):
        self.prepare(steps)
        cfg, bb = self.config, self.backbone
        encode = bb.encode_text
        if self.flow and cfg.max_sequence_length:
            encode = lambda t: bb.encode_text(t, max_sequence_length=cfg.max_sequence_length)  # noqa: E731
        cond = encode(texts)
        x_T = per_sample_noise(noise_keys, bb.sample_shape, device=bb.device)
        if cfg.guidance == "cfg":
            uncond = encode([""] * len(texts))
            model_output = lambda x, t: self.denoiser.raw_guided(x, t, cond, uncond, cfg.guidance_scale)  # noqa: E731
        elif self.flow:  # FLUX's guidance embedding (embedded) or none
            model_output = self.denoiser.guided(cfg.guidance, cond, None, cfg.guidance_scale)
        else:
            w = cfg.guidance_scale - 1.0 if cfg.guidance == "embedded" else None
            model_output = lambda x, t: self.denoiser.raw(x, t, cond, w)  # noqa: E731
        stochastic = cfg.scheduler in STOCHASTIC
        x0 = solver_sample(model_output, self.scheduler(), self.schedule(), x_T, steps, self.denoiser.prediction_type,
                           generators=per_sample_generators(noise_keys, 1) if stochastic else None,
                           timesteps=list(cfg.timesteps) if cfg.timesteps else None,
                           step_kwargs={"eta": cfg.eta} if cfg.scheduler == "tcd" and cfg.eta is not None else None)
        return bb.to_images(x0)


def _is_flow_transformer(backbone) -> bool:
    """Whether the backbone is an SD3/FLUX transformer (imported here: only real-scale runs load that module)."""
    if getattr(backbone, "prediction_type", None) != "flow" or not hasattr(backbone, "transformer"):
        return False
    from methods.backbones.flow import FlowBackbone

    return isinstance(backbone, FlowBackbone)
