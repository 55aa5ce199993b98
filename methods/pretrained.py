"""Published distilled checkpoints, loaded from local paths and measured under the bench's protocol.

A checkpoint is the weights (``path``) plus the way its authors sample it: scheduler, timestep spacing (or explicit
timesteps), output parameterisation (``prediction_type``: epsilon, v_prediction or sample = x̂_0), guidance (none: 1 NFE
per step; cfg: classifier-free guidance at ``guidance_scale``, 2 NFE; embedded: LCM's guidance embedding with
w = guidance_scale − 1, or FLUX.1-dev's at guidance_scale, 1 NFE) and the image side it was trained at
(``resolution``, sampled through ``backbone.at_resolution``). ``recipe`` fills these from RECIPES, derived from the model
cards' diffusers snippets kept as data in ``methods/cards/cards.json`` (``recipe_from_card``; docs/recipes.md); anything
given explicitly wins. Text encoders, VAE and noise schedule are the backbone's.

Weights, by path: a diffusers UNet / transformer directory, a pipeline directory (its unet/ or transformer/), a
single-file state dict of the whole network (SDXL-Lightning's ``*_unet.safetensors``; told from a LoRA by its keys and
loaded strictly) or a LoRA, always in the backbone's dtype and through ``backbone.prepare_net`` (compile mode, memory
format) before the NFE counter. Pickles (DMD2's ``.bin``) are refused with the command that converts them
(``flashbench convert-checkpoint``, ``convert_checkpoint``).

On a rectified-flow backbone (SD3, FLUX.1: ``methods.backbones.flow``) the network is the transformer, sampled with
FlowMatchEulerDiscreteScheduler (``flow-euler``) on the backbone's schedule, with the checkpoint's own ``shift`` /
``dynamic_shifting`` (FLUX.1-schnell ships shift 1 without dynamic shifting), T5 ``max_sequence_length`` and LoRA fusing
scale (``lora_scale``).

LoRAs are read in any common key layout (diffusers/peft, kohya ``lora_unet_…``, …) through diffusers' own converters;
after loading, every key must have been injected into an adapter, else the checkpoint is refused (a silent no-op LoRA
would measure the base model); LoRAs that also adapt the text encoders are refused (the backbone's encoders are shared
by every row). A fused LoRA's adapter layers are removed, its weights kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
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

# --- the model cards, as data (methods/cards/cards.json) -------------------------------------------------------------
CARDS_FILE = Path(__file__).parent / "cards" / "cards.json"
# the diffusers scheduler class a card names -> this method's scheduler setting
SCHEDULER_CLASSES = {"LCMScheduler": "lcm", "EulerDiscreteScheduler": "euler",
                     "EulerAncestralDiscreteScheduler": "euler-ancestral", "DDIMScheduler": "ddim",
                     "TCDScheduler": "tcd", "FlowMatchEulerDiscreteScheduler": "flow-euler"}
# what a scheduler built from a repository's own config takes for a key that config leaves out: each class's __init__
# defaults for the keys a recipe carries (tests/test_cards.py checks them against diffusers)
_VP = {"prediction_type": "epsilon"}
SCHEDULER_DEFAULTS = {"LCMScheduler": {**_VP, "timestep_spacing": "leading"},
                      "EulerDiscreteScheduler": {**_VP, "timestep_spacing": "linspace"},
                      "EulerAncestralDiscreteScheduler": {**_VP, "timestep_spacing": "linspace"},
                      "DDIMScheduler": {**_VP, "timestep_spacing": "leading"},
                      "TCDScheduler": {**_VP, "timestep_spacing": "leading"},
                      "FlowMatchEulerDiscreteScheduler": {"shift": 1.0, "use_dynamic_shifting": False}}
# how a published checkpoint ships: a diffusers UNet directory, a pipeline directory (its unet/ or transformer/), a
# single-file UNet state dict (safetensors, or a pickle to convert), a LoRA, a transformer directory
FORMATS = ("unet-dir", "pipeline-dir", "unet-file", "unet-bin", "lora", "transformer-dir")
CARD_KEYS = ("recipe", "source", "family", "base_model", "pipeline", "checkpoint", "alternatives", "kind",
             "guidance_embedding", "scheduler", "num_inference_steps", "example_steps", "guidance_scale", "eta",
             "timesteps", "lora_scale", "max_sequence_length", "height", "width", "pipeline_defaults", "resolution",
             "checked", "unverified")


def load_cards(path: Path = CARDS_FILE) -> dict[str, dict]:
    """recipe name -> its model card's settings (methods/cards/cards.json), in the file's order. RuntimeError when a
    card lacks a key or names a scheduler class or checkpoint format this method does not know (a broken data file,
    not user input)."""
    cards = {}
    for card in json.loads(Path(path).read_text(encoding="utf-8"))["cards"]:
        missing = [k for k in CARD_KEYS if k not in card]
        problems = missing + [c for c in [card.get("scheduler", {}).get("class")] if c not in SCHEDULER_CLASSES]
        problems += [f for f in [card.get("checkpoint", {}).get("format")] if f not in FORMATS]
        if problems or card["kind"] not in KINDS or card["recipe"] in cards:
            raise RuntimeError(f"{path}: card {card.get('recipe')!r} is malformed ({problems or card['kind']})")
        rewards = card.get("trained_on_rewards", [])
        if not isinstance(rewards, list) or not all(isinstance(r, str) for r in rewards) or (
                rewards and not card.get("trained_on_rewards_source")):
            raise RuntimeError(f"{path}: card {card['recipe']!r}: trained_on_rewards must be a list of reward names with "
                               "a trained_on_rewards_source saying where the card or paper says so")
        cards[card["recipe"]] = card
    return cards


def trained_on_rewards(recipe: str) -> tuple[str, ...]:
    """The reward models a published checkpoint was trained with, as its card records them (``trained_on_rewards``:
    names a preference metric declares as its ``reward``); () for no recipe or a card that records none."""
    return tuple(CARDS[recipe].get("trained_on_rewards", ())) if recipe in CARDS else ()


def recipe_from_card(card: dict) -> dict:
    """A card's diffusers snippet as this method's settings (the RECIPES entry).

    Scheduler: its class; from a repository's own config (``card["scheduler"]["config"]`` a dict) every key the recipe
    can carry comes from that config, else the class default; from the base pipeline's config ("base") only the
    keyword overrides the card passes to ``from_config``. Guidance, as the card's pipeline reads ``guidance_scale``: a
    guidance-embedded network (LCM's w-embedding, FLUX.1-dev) gets it as its embedded scale; otherwise > 1 is CFG and
    ≤ 1 none (StableDiffusion(XL)Pipeline / StableDiffusion3Pipeline). Steps: the ``num_inference_steps`` the card
    names; resolution: the side the checkpoint was trained at.
    """
    sched = card["scheduler"]
    own = sched["config"] if isinstance(sched["config"], dict) else None
    given = {**(own or {}), **sched["overrides"]}
    recipe: dict = {"kind": card["kind"], "scheduler": SCHEDULER_CLASSES[sched["class"]]}
    scale = float(card["guidance_scale"])
    if card["guidance_embedding"]:
        recipe.update(guidance="embedded", guidance_scale=scale)
    elif scale > 1:
        recipe.update(guidance="cfg", guidance_scale=scale)
    else:
        recipe["guidance"] = "none"
    recipe["steps"] = tuple(card["num_inference_steps"])
    settings = {"shift": "shift", "use_dynamic_shifting": "dynamic_shifting", "timestep_spacing": "timestep_spacing",
                "prediction_type": "prediction_type"}
    for key, default in SCHEDULER_DEFAULTS[sched["class"]].items():
        if key in given or own is not None:
            recipe[settings[key]] = given.get(key, default)
    if "shift" in recipe:
        recipe["shift"] = float(recipe["shift"])
    for key in ("eta", "lora_scale", "max_sequence_length"):
        if card[key] is not None:
            recipe[key] = card[key]
    if card["timesteps"]:
        recipe["timesteps"] = tuple(card["timesteps"])
    recipe["resolution"] = int(card["resolution"])
    return recipe


CARDS: dict[str, dict] = load_cards()
# Published few-step checkpoints, as their model cards sample them (`path` is yours: a local copy).
RECIPES: dict[str, dict] = {name: recipe_from_card(card) for name, card in CARDS.items()}


@dataclasses.dataclass
class PretrainedConfig:
    path: str = ""  # a UNet / transformer / pipeline directory, a single-file UNet state dict, or a LoRA (.safetensors)
    recipe: str = ""  # a key of RECIPES: the model card's sampling settings (explicit settings win)
    kind: str | None = None  # lcm, lcm-lora, turbo, lightning (legacy names), unet, lora or transformer
    scheduler: str | None = None  # lcm, euler, euler-ancestral, ddim, tcd, flow-euler
    guidance: str | None = None  # none (1 NFE/step), cfg (2 NFE/step), embedded (LCM w / FLUX guidance, 1 NFE/step)
    guidance_scale: float | None = None  # CFG scale, or the embedded w + 1 (LCM's convention); default 8.0 / 0
    prediction_type: str | None = None  # the checkpoint's output: epsilon, v_prediction or sample (x̂_0)
    # the VP scheduler's timestep spacing; None: trailing, or with a recipe whose card leaves it, the backbone's
    timestep_spacing: str | None = None
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
    resolution: int | None = None  # image side (pixels) sampled at; None: the backbone's. Recipes: the trained side

    def __post_init__(self):
        if self.recipe:
            if self.recipe not in RECIPES:
                raise unknown("checkpoint recipe", self.recipe, RECIPES)
            for k, v in RECIPES[self.recipe].items():
                if getattr(self, k) is None:
                    setattr(self, k, v)
        self.kind = self.kind or "unet"
        if not self.recipe:
            self.timestep_spacing = self.timestep_spacing or "trailing"
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
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be an image side in pixels (>= 8), got {self.resolution}")
        if not self.path:
            raise UserError(f"pretrained {self.recipe or self.kind}: give path = the local checkpoint (UNet, transformer "
                            "or pipeline directory, single-file UNet or LoRA .safetensors)")


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


# --- checkpoint files ------------------------------------------------------------------------------------------------
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT = "flashbench convert-checkpoint IN.bin OUT.safetensors"
# keys only a LoRA (or another adapter) file has: peft/diffusers (lora_A/lora_B, lora.down/up), kohya (lora_unet_…,
# lora_down/lora_up, .alpha), LyCORIS (hada_, lokr_), DoRA
_ADAPTER_KEY = re.compile(r"(^|[._])(lora|lora_[AB]|lora_down|lora_up|hada_w\d|lokr_w\d|dora_scale)([._]|$)|\.alpha$")


def pickle_refusal(name: str, path: Path) -> UserError:
    """The one-line refusal of a pickled checkpoint, naming the conversion command."""
    return UserError(f"pretrained {name}: {path.name} is a pickle checkpoint and flashbench loads safetensors only; "
                     f"convert it first: `{CONVERT}`, then give path = the .safetensors file")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor in a safetensors file, read from its header (no tensor is loaded). UserError when
    the file is not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path.name}: not a safetensors file ({str(e).splitlines()[0][:160]})") from None


def is_adapter(keys) -> bool:
    """Whether a state dict's keys are a LoRA's (or another adapter's) rather than a network's own weights."""
    return any(_ADAPTER_KEY.search(k) for k in keys)


def load_full_state_dict(net_cls, config, path: Path, dtype: torch.dtype, device, what: str = "UNet"):
    """A network of class `net_cls` built from `config` (the backbone's network's) with every weight from the
    safetensors state dict at `path`, strictly: the file must hold exactly the network's keys at its shapes.

    Built on the meta device and filled in place (no random initialisation of billions of weights), floating tensors cast
    to `dtype` (the backbone's), then moved to `device`. As the model cards' ``UNet2DConditionModel.from_config(base,
    subfolder="unet"); unet.load_state_dict(load_file(...))`` (SDXL-Lightning, DMD2, Hyper-SDXL-1step-Unet).
    UserError (one line) for an original (LDM) single-file checkpoint or any missing, unexpected or reshaped key.
    """
    from safetensors.torch import load_file

    shapes = safetensors_shapes(path)
    if any(k.startswith("model.diffusion_model.") for k in shapes):
        raise UserError(f"{path.name} is an original (LDM/ComfyUI) single-file checkpoint, not a diffusers {what} "
                        f"state dict; give the diffusers {what} file (e.g. sdxl_lightning_4step_unet.safetensors) or a "
                        "diffusers directory")
    with torch.device("meta"):
        net = net_cls.from_config(config)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    reshaped = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise UserError(f"{path.name} does not fit the backbone's {what}: {len(missing)} keys missing, {len(unexpected)} "
                        f"unexpected, {len(reshaped)} of another shape (e.g. {example}); give the {what} state dict "
                        "distilled from this backbone")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    net.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:  # a buffer the file does not carry: the class would need its own initialisation
        raise RuntimeError(f"{net_cls.__name__} keeps {len(left)} tensors on the meta device after loading ({left[0]})")
    return net.to(device)


def convert_checkpoint(src: Path, dst: Path) -> dict:
    """A pickled flat tensor state dict (DMD2's ``dmd2_sdxl_*_unet_fp16.bin``) rewritten as safetensors, tensors and
    dtypes unchanged; returns {"tensors": n, "sha256": of dst}.

    Reads with ``torch.load(weights_only=True)`` (no code runs). UserError (one line, nothing written) when `src` is
    missing or already safetensors, `dst` exists or is not .safetensors, or the file holds anything but a flat
    {str: tensor} mapping (a wrapped {"state_dict": ...}, a whole module, ...).
    """
    from core.io import save_tensors

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"convert-checkpoint: {src} does not exist; give the .bin / .pt file to convert")
    if src.suffix == ".safetensors":
        raise UserError(f"convert-checkpoint: {src.name} is already safetensors; give it to pretrained as it is")
    if dst.suffix != ".safetensors":
        raise UserError(f"convert-checkpoint: the output must be a .safetensors path, got {dst.name}")
    if dst.exists():
        raise UserError(f"convert-checkpoint: {dst} already exists; choose another output path")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except (torch.serialization.pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise UserError(f"convert-checkpoint: {src.name} is not a plain tensor state dict that torch.load("
                        f"weights_only=True) reads ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or not state:
        raise UserError(f"convert-checkpoint: {src.name} holds a {type(state).__name__}, not a flat {{name: tensor}} "
                        "state dict")
    bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise UserError(f"convert-checkpoint: {src.name} is not a flat tensor state dict: key {bad[0]!r} holds a "
                        f"{type(bad[1]).__name__}, not a tensor")
    seen, tensors = set(), {}
    for k, v in state.items():  # tied weights share storage; safetensors stores each tensor on its own
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    digest = save_tensors(dst, tensors, {"format": "pt", "converted_from": src.name})
    return {"tensors": len(tensors), "sha256": digest}


def _weights_in(folder: Path) -> tuple[list[Path], str | None]:
    """The safetensors a diffusers model folder loads (plain, else its only variant) and that variant; ([], None)
    when it holds none."""
    from methods.backbones.directory import variants_in, weight_files

    stem = "diffusion_pytorch_model"
    files = weight_files(folder, stem, None)
    if files:
        return files, None
    found = sorted(variants_in(folder, stem))
    return (weight_files(folder, stem, found[0]), found[0]) if len(found) == 1 else ([], None)


def _digest(files: list[Path]) -> str:
    """sha256 of one weight file, or of the (name, sha256) list of a sharded one."""
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256(json.dumps([[f.name, sha256_file(f)] for f in files]).encode()).hexdigest()


# configuration keys a checkpoint's network must share with the backbone's to take its conditioning and latents
FIT_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
            "projection_class_embeddings_input_dim", "joint_attention_dim", "pooled_projection_dim", "patch_size")


@register("pretrained")
class Pretrained(Method):
    """Published distilled checkpoints from local paths (LCM, Turbo, Lightning, Hyper-SD, TCD, DMD2; SD3.5 Turbo, FLUX)."""

    Config = PretrainedConfig
    takes_conventions = False  # the card's guidance and scheduler, not the backbone pipeline's defaults

    def __init__(self, backbone, config: PretrainedConfig, ctx):
        """Samples through ``backbone.at_resolution(config.resolution)`` (the side the checkpoint was trained at).

        Raises UserError when the checkpoint's sampler does not fit the backbone (a flow scheduler or flow settings
        on an SD/SDXL backbone, a VP scheduler on a flow transformer), or a resolution the backbone cannot sample at."""
        name = config.recipe or config.kind
        flow = _is_flow_transformer(backbone)
        flow_schedule = backbone.schedule.kind == "flow"  # an SD3/FLUX transformer, or the embedded flow UNet
        flow_only = [k for k in ("shift", "dynamic_shifting", "max_sequence_length") if getattr(config, k) is not None]
        if not flow and (config.kind == "transformer" or (flow_only and flow_schedule)):
            raise UserError(f"pretrained {name}: a rectified-flow transformer checkpoint "
                            f"({', '.join(flow_only) or config.kind}); the backbone is not an SD3/FLUX pipeline")
        if not flow_schedule and (config.scheduler == "flow-euler" or flow_only):
            raise UserError(f"pretrained {name}: a rectified-flow checkpoint ({', '.join(flow_only) or config.scheduler}); "
                            "the backbone's schedule is VP (SD/SDXL)")
        if flow_schedule and config.scheduler != "flow-euler":
            raise UserError(f"pretrained {name}: scheduler {config.scheduler!r} is for VP (SD/SDXL) schedules; on a "
                            "rectified-flow backbone use scheduler = 'flow-euler'")
        if flow and config.kind not in ("transformer", "lora"):
            raise UserError(f"pretrained {name}: kind {config.kind!r} is a UNet checkpoint; on a flow backbone use "
                            "kind = 'transformer' (a diffusers transformer directory) or 'lora'")
        super().__init__(_at_resolution(backbone, config.resolution, name), config, ctx)
        self.denoiser = None
        self.info = None
        self.flow = flow

    @classmethod
    def nfe_per_step(cls, config) -> int:
        return 2 if config.guidance == "cfg" else 1

    def release(self) -> None:
        super().release()
        self.denoiser = self.info = None

    @classmethod
    def allowed_steps(cls, config) -> tuple[int, ...]:
        return tuple(config.steps) or tuple(range(1, config.max_steps + 1))

    def settings(self) -> dict:
        """The resolved settings, with the image side actually sampled at."""
        return {**dataclasses.asdict(self.config), "resolution": getattr(self.backbone, "resolution", None)}

    def prepare(self, steps: int) -> TrainInfo:
        """Load the checkpoint in the backbone's dtype and device, prepare it for sampling (``backbone.prepare_net``:
        the suite's compile mode and memory format) and count its evaluations.

        Formats (by path): a directory (a diffusers UNet / transformer folder, or a pipeline directory holding unet/ or
        transformer/), a .safetensors file holding a LoRA or a whole network's state dict (told apart by its keys).
        UserError (one line) for a missing path, a pickle (.bin: names ``flashbench convert-checkpoint``), weights
        that do not fit the backbone, or guidance = 'embedded' without a guidance embedding."""
        if self.denoiser is not None:
            return self.info
        cfg, bb = self.config, self.backbone
        name = cfg.recipe or cfg.kind
        path = Path(cfg.path)
        if not path.exists():
            raise UserError(f"pretrained {name}: {path} does not exist")
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(name, path)
        if path.is_file() and path.suffix != ".safetensors":
            raise UserError(f"pretrained {name}: {path.name} must be a directory or a .safetensors file (a LoRA or a "
                            "single-file UNet/transformer state dict)")
        net, digest = self._load(path, name)
        net = net.to(bb.device).eval().requires_grad_(False)
        net = bb.prepare_net(net)
        if self.flow:
            if cfg.guidance == "embedded" and not net.guidance_embeds:
                raise UserError(f"pretrained {name}: {path} has no guidance embedding (FLUX.1-dev's); use guidance = "
                                "'none' or 'cfg'")
            self.denoiser = Denoiser(self.counted(net), self.schedule(), bb.prediction_type)
        else:
            w_dim = net.config.time_cond_proj_dim if cfg.guidance == "embedded" else None
            if cfg.guidance == "embedded" and not w_dim:
                raise UserError(f"pretrained {name}: {path} has no guidance embedding (time_cond_proj_dim); use "
                                "guidance = 'none' or 'cfg'")
            self.denoiser = Denoiser(self.counted(net), bb.schedule, cfg.prediction_type or bb.prediction_type, w_dim)
        self.info = TrainInfo(cached=True, checkpoint=path.name, checkpoint_sha256=digest)
        return self.info

    def _load(self, path: Path, name: str):
        """(network in the backbone's dtype, sha256 of the files read) for a checkpoint path (see ``prepare``)."""
        bb = self.backbone
        denoiser = bb.transformer if self.flow else bb.net
        what = "transformer" if self.flow else "UNet"
        if path.is_dir():
            folder = next((path / d for d in ("unet", "transformer") if (path / d).is_dir()), path)
            files, variant = _weights_in(folder)
            if not files:
                pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
                if pickles:
                    raise pickle_refusal(name, folder / pickles[0])
                raise UserError(f"pretrained {name}: {folder} holds no .safetensors {what} weights "
                                "(diffusion_pytorch_model.safetensors, a variant or a sharded index)")
            try:
                net = type(denoiser).from_pretrained(folder, local_files_only=True, use_safetensors=True, variant=variant,
                                                     torch_dtype=bb.dtype)
            except (OSError, ValueError) as e:
                raise UserError(f"pretrained {name}: cannot load the {what} in {folder} "
                                f"({str(e).splitlines()[0][:160]})") from None
            _check_fits(net.config, denoiser.config, name, folder)
            return (bb.wrap(net) if self.flow else net), _digest(files)
        keys = safetensors_shapes(path)
        if is_adapter(keys):  # a LoRA on a copy of the backbone's network, fused at lora_scale as the cards' fuse_lora
            net = bb.new_net()
            target = net.transformer if self.flow else net
            if self.flow:
                load_lora_strict(target, path, prefix="transformer", loader=type(bb.pipeline()))
            else:
                load_lora_strict(target, path)
            target.fuse_lora(lora_scale=self.config.lora_scale)
            target.unload_lora()  # the fused weights stay; the adapter layers (kept in fp32 by peft) go
            return net.to(bb.dtype), sha256_file(path)
        try:
            net = load_full_state_dict(type(denoiser), denoiser.config, path, bb.dtype, bb.device, what)
        except UserError as e:
            raise UserError(f"pretrained {name}: {e}") from None
        return (bb.wrap(net) if self.flow else net), sha256_file(path)

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
        """The diffusers scheduler the checkpoint's authors sample with, on the backbone's noise schedule: the
        backbone's scheduler config with the recipe's timestep spacing and prediction type (flow: shift, dynamic
        shifting), as the cards' ``Scheduler.from_config(pipe.scheduler.config, **overrides)``."""
        import diffusers

        cfg = self.config
        if cfg.scheduler == "flow-euler":
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.flow_scheduler_config())
        base = dict(self.backbone.scheduler_config)
        if cfg.timestep_spacing:
            base["timestep_spacing"] = cfg.timestep_spacing
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
        """Images float32 [N, 3, R, R] in [0, 1], R the recipe's resolution (the backbone's when none)."""
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


def _at_resolution(backbone, resolution: int | None, name: str):
    """`backbone` sampling images of side `resolution` (its view; itself for None or its own side). UserError when it
    samples at one fixed side only (the embedded shapes teacher) and `resolution` is another."""
    if resolution is None or resolution == getattr(backbone, "resolution", None):
        return backbone
    if not hasattr(backbone, "at_resolution"):
        raise UserError(f"pretrained {name}: resolution {resolution} was asked for, but this backbone samples at one "
                        "fixed side; leave resolution unset")
    return backbone.at_resolution(resolution)


def _check_fits(config, backbone_config, name: str, folder: Path) -> None:
    """UserError when a loaded network's configuration differs from the backbone's network's in a key that fixes its
    inputs (latent channels, text-state width, pooled/time conditioning, patch size)."""
    differ = [k for k in FIT_KEYS if k in config and k in backbone_config and config[k] != backbone_config[k]]
    if differ:
        k = differ[0]
        raise UserError(f"pretrained {name}: the network in {folder} does not fit this backbone ({k} {config[k]} vs the "
                        f"backbone's {backbone_config[k]}); give the backbone it was distilled from")


def _is_flow_transformer(backbone) -> bool:
    """Whether the backbone is an SD3/FLUX transformer (imported here: only real-scale runs load that module)."""
    if getattr(backbone, "prediction_type", None) != "flow" or not hasattr(backbone, "transformer"):
        return False
    from methods.backbones.flow import FlowBackbone

    return isinstance(backbone, FlowBackbone)
