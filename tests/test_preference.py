"""Preference-score metrics on random-weight stand-ins of their real architectures (tiny configs of the same classes),
saved in the real file layouts and loaded through each metric's own loader: shapes, determinism, batch independence,
the one-line refusals, and each score recomputed by hand from the model's own embeddings. Offline; nothing is trained."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.metrics import registry
from bench.metrics.preference import RewardMLP, reward_flags, weights_sha256
from core.errors import UserError
from prompts.loaders import Prompt

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEXTS = ["a red cat", "two blue dogs", "a tree at dawn", "zebra", "an empty room", "cat", "a small green box"]
CPU = types.SimpleNamespace(device="cpu")


def prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p{i}", TEXTS[i % len(TEXTS)]) for i in range(n)]


def images(n: int, side: int = 40, seed: int = 0) -> torch.Tensor:
    """8-bit-level float32 images [n, 3, side, side] in [0, 1], as the runner measures them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, side, side, generator=g) * 255).round() / 255


def check_contract(metric, n: int = 7) -> torch.Tensor:
    """Rows [n, 1] float64, deterministic, and the same whatever the batch split (in_fixed_chunks at chunk 4)."""
    x, ps = images(n), prompts(n)
    rows = metric.per_sample(x, ps)
    assert rows.shape == (n, 1) and rows.dtype == torch.float64 and torch.isfinite(rows).all()
    assert torch.equal(rows, metric.per_sample(x, ps))
    split = torch.cat([metric.per_sample(x[:3], ps[:3]), metric.per_sample(x[3:], ps[3:])])
    assert torch.equal(rows, split)
    row = metric.compute(rows)
    assert row[f"{metric.name}_ci_low"] <= row[metric.name] <= row[f"{metric.name}_ci_high"]
    proto = metric.protocol()
    assert len(proto["weights_sha256"]) == 64 and proto["preprocessing"]
    return rows[:, 0]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 4 rows so that a 7-sample batch takes the padded path (CHUNK is 64 in the runner)."""
    monkeypatch.setattr("bench.metrics.preference.CHUNK", 4)  # PreferenceScore.per_sample, every preference metric


def tiny_open_clip(tmp_path, name: str, quick_gelu: bool = False) -> str:
    """An open_clip model config of the real CLIP class, tiny, registered under `name`."""
    import open_clip

    cfg = {"embed_dim": 16, "quick_gelu": quick_gelu,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def metric(name: str, **settings):
    cls = registry.get(name)
    return cls(CPU, prompts(1), None, cls.make_config(settings, name))


# --- declarations ----------------------------------------------------------------------------------------------------

PREFERENCE = {"hpsv2": "hpsv2", "pickscore": "pickscore", "image_reward": "image_reward", "aesthetic": "laion_aesthetic",
              "hpsv3": "hpsv3"}


def test_declared_optional_with_reward_names():
    from bench import specs

    declared = registry.declared()
    for name, reward in PREFERENCE.items():
        d = declared[name]
        assert d["reward"] == reward and not d["always"] and d["needs"] == ()
        (col,) = d["columns"]
        assert col["key"] == name and col["direction"] == "higher" and col["show_ci"] and col["main"] is False
        assert name not in specs.MAIN_COLUMNS and name in specs.SPECS


@pytest.mark.parametrize("name,settings,needle", [
    ("hpsv2", {}, "set path"),
    ("hpsv2", {"path": "/nonexistent/HPS_v2.1_compressed.pt"}, "is not a file"),
    ("pickscore", {"path": "/nonexistent"}, "is not a directory"),
    ("image_reward", {}, "ImageReward.pt"),
    ("aesthetic", {"path": "/nonexistent.pth"}, "is not a file"),
    ("hpsv3", {}, "set path"),
])
def test_check_refuses_missing_weights(name, settings, needle):
    cls = registry.get(name)
    with pytest.raises(UserError, match=needle) as e:
        cls.check(prompts(2), "suite", "real", cls.make_config(settings, name))
    assert "\n" not in str(e.value)


def test_missing_optional_dependency_names_the_extra():
    from bench.metrics.preference import require_module

    with pytest.raises(UserError, match=r"flashbench\[preference\]"):
        require_module("hpsv2", "no_such_module_for_flashbench")


def test_reward_flags_follow_the_cards():
    from methods.pretrained import CARDS, trained_on_rewards

    assert trained_on_rewards("hyper-sdxl-4step-lora") == ("image_reward",)
    assert all(CARDS[r].get("trained_on_rewards_source") for r in CARDS if trained_on_rewards(r))
    metrics = ["fid", "image_reward", "hpsv2"]
    assert reward_flags({"recipe": "hyper-sdxl-4step-lora"}, metrics) == {
        "image_reward_reward_trained": True, "hpsv2_reward_trained": False}
    assert reward_flags({"recipe": "sdxl-lightning-4step"}, metrics)["image_reward_reward_trained"] is False
    assert reward_flags({}, ["fid"]) == {}


def test_weights_sha256_of_file_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"x")
    first = weights_sha256(tmp_path / "d")
    (tmp_path / "d" / "a.bin").write_bytes(b"yy")
    assert weights_sha256(tmp_path / "d") != first
    assert len(weights_sha256(tmp_path / "d" / "a.bin")) == 64


# --- HPSv2 -----------------------------------------------------------------------------------------------------------


def test_hpsv2_is_the_cosine_of_the_hps_model(tmp_path):
    import open_clip

    name = tiny_open_clip(tmp_path, "flashbench-tiny-hps")
    torch.manual_seed(0)
    ref = open_clip.create_model(name, pretrained=None).eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    m = metric("hpsv2", path=str(tmp_path / "HPS_v2.1_compressed.pt"), model=name)
    scores = check_contract(m)
    assert scores.abs().max() <= 1
    # by hand: the unnormalised embeddings of the model saved, under hpsv2's preprocess_val
    x, ps = images(2), prompts(2)
    pre = open_clip.image_transform(32, is_train=False, resize_mode="longest")
    from bench.metrics.preference import to_pil

    px = torch.stack([pre(im) for im in to_pil(x)])
    with torch.no_grad():
        cos = F.cosine_similarity(ref.encode_image(px), ref.encode_text(open_clip.get_tokenizer(name)([p.text for p in ps])))
    torch.testing.assert_close(m.per_sample(x, ps)[:, 0], cos.double(), rtol=1e-5, atol=1e-6)


# --- PickScore -------------------------------------------------------------------------------------------------------


def tiny_clip_processor(folder):
    """A CLIP processor in laion/CLIP-ViT-H-14's layout (tokenizer files + preprocessor_config.json), tiny vocabulary:
    every letter, alone and word-final (CLIP's BPE with no merges)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    folder.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(folder)
    return len(vocab)


def tiny_pickscore_config(vocab: int):
    """PickScore_v1's architecture (a transformers CLIPConfig), tiny: 1-layer towers of width 32 on 32 px images."""
    from transformers import CLIPConfig

    return CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                       pad_token_id=1),
                      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=32, patch_size=16), projection_dim=16, logit_scale_init_value=3.0)


def test_pickscore_is_logit_scale_times_cosine(tmp_path):
    from transformers import AutoProcessor, CLIPModel

    vocab = tiny_clip_processor(tmp_path / "processor")
    torch.manual_seed(0)
    cfg = tiny_pickscore_config(vocab)
    ref = CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path / "PickScore_v1")
    m = metric("pickscore", path=str(tmp_path / "PickScore_v1"), processor=str(tmp_path / "processor"))
    scores = check_contract(m)
    assert scores.abs().max() <= 3.0 ** 0 * torch.e ** 3.0 + 1e-6  # |logit_scale.exp() · cos| <= e³
    # by hand, as the model card: processor(images), processor(text), normalised features, logit_scale.exp() · cos
    x, ps = images(2), prompts(2)
    from bench.metrics.preference import to_pil

    proc = AutoProcessor.from_pretrained(tmp_path / "processor")
    img_in = proc(images=to_pil(x), return_tensors="pt")
    txt_in = proc(text=[p.text for p in ps], padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = ref.get_image_features(**img_in)
        txt = ref.get_text_features(**txt_in)
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
        expected = ref.logit_scale.exp() * F.cosine_similarity(img, txt)
    torch.testing.assert_close(m.per_sample(x, ps)[:, 0], expected.double(), rtol=1e-5, atol=1e-5)


# --- ImageReward -----------------------------------------------------------------------------------------------------

_TO_BLIP = ((r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
            (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
            (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
            (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
            (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
            (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
            (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."), (r"^post_layernorm\.", "norm."))


def to_blip_layout(state: dict) -> dict:
    """transformers BlipVisionModel names -> BLIP's ViT names (the inverse of the metric's renaming, written apart)."""
    import re

    out = {}
    for k, v in state.items():
        for pattern, repl in _TO_BLIP:
            if re.search(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        out[k] = v
    return out


def image_reward_stand_in(d: Path, texts: list[str]) -> dict:
    """ImageReward's files, tiny: ImageReward.pt (BLIP's ViT and BERT names, an unused BLIP head and the MLP),
    med_config.json and a bert-base-uncased tokenizer knowing `texts`' words; the networks returned (eval mode)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    tok_dir = d / "bert-base-uncased"
    tok_dir.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, *sorted({w for t in texts for w in t.split()})]
    (tok_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    med = {"vocab_size": len(words) + 2, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 64, "layer_norm_eps": 1e-12,
           "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 768}
    (d / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=32, patch_size=16,
                                              layer_norm_eps=1e-6)).eval()
    text = BlipTextModel(BlipTextConfig(vocab_size=len(words) + 2, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                        encoder_hidden_size=64, is_decoder=True), add_pooling_layer=False).eval()
    mlp = RewardMLP(32).eval()
    state = {**{f"blip.visual_encoder.{k}": v for k, v in to_blip_layout(vision.state_dict()).items()},
             **{f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()},
             "blip.text_encoder.embeddings.position_ids": torch.arange(64)[None],
             "blip.vision_proj.weight": torch.zeros(4, 64),  # BLIP_Pretrain's other heads: present, unused
             **{f"mlp.{k}": v for k, v in mlp.state_dict().items()}}
    torch.save(state, d / "ImageReward.pt")
    return {"path": d / "ImageReward.pt", "med_config": d / "med_config.json", "tokenizer": tok_dir,
            "vision": vision, "text": text, "mlp": mlp}


def test_image_reward_is_the_normalised_mlp_of_the_cls_state(tmp_path):
    from transformers import BertTokenizer

    from bench.metrics.image_reward import REWARD_MEAN, REWARD_STD

    ir = image_reward_stand_in(tmp_path, TEXTS)
    tok_dir, vision, text, mlp = ir["tokenizer"], ir["vision"], ir["text"], ir["mlp"]
    m = metric("image_reward", path=str(tmp_path / "ImageReward.pt"), med_config=str(tmp_path / "med_config.json"),
               tokenizer=str(tok_dir))
    check_contract(m)
    # by hand: BLIP's tokenizer (35 tokens), ViT tokens, text encoder cross-attending, MLP on [CLS], normalised
    from torchvision import transforms as T

    from bench.metrics.preference import OPENAI_MEAN, OPENAI_STD, to_pil

    x, ps = images(2), prompts(2)
    pre = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                     T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    tok = BertTokenizer(str(tok_dir / "vocab.txt"))(
        [p.text for p in ps], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        emb = vision(pixel_values=torch.stack([pre(im) for im in to_pil(x)])).last_hidden_state
        out = text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=emb,
                   encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long), is_decoder=False)
        expected = (mlp(out.last_hidden_state[:, 0])[:, 0] - REWARD_MEAN) / REWARD_STD
    torch.testing.assert_close(m.per_sample(x, ps)[:, 0], expected.double(), rtol=1e-5, atol=1e-5)


def test_image_reward_refuses_a_checkpoint_that_does_not_map(tmp_path):
    from bench.metrics.image_reward import load_image_reward

    torch.save({"mlp.layers.0.weight": torch.zeros(1024, 8)}, tmp_path / "ImageReward.pt")
    with pytest.raises(UserError, match="no blip.visual_encoder"):
        load_image_reward(str(tmp_path / "ImageReward.pt"), "", "", "cpu")


# --- aesthetic -------------------------------------------------------------------------------------------------------


def test_aesthetic_is_the_mlp_of_the_normalised_clip_embedding(tmp_path):
    import open_clip

    name = tiny_open_clip(tmp_path, "flashbench-tiny-l14-quickgelu", quick_gelu=True)
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None).eval()
    torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    mlp = RewardMLP(16).eval()
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    m = metric("aesthetic", path=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
               clip_pretrained=str(tmp_path / "open_clip_pytorch_model.bin"), clip_model=name)
    check_contract(m)
    from bench.metrics.preference import to_pil

    x = images(2)
    pre = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        emb = clip.encode_image(torch.stack([pre(im) for im in to_pil(x)]))
        expected = mlp(emb / emb.norm(dim=-1, keepdim=True))[:, 0]
    torch.testing.assert_close(m.per_sample(x, prompts(2))[:, 0], expected.double(), rtol=1e-5, atol=1e-5)


def test_reward_mlp_refuses_other_shapes():
    with pytest.raises(UserError, match="does not fit"):
        RewardMLP.from_state({"layers.0.weight": torch.zeros(1024, 8), "layers.0.bias": torch.zeros(1024),
                              "layers.2.weight": torch.zeros(99, 1024)}, "aesthetic")


# --- HPSv3 -----------------------------------------------------------------------------------------------------------


def test_hpsv3_declared_loads_its_shape_contract_and_is_refused(tmp_path):
    from transformers import Qwen2VLConfig

    from bench.metrics.hpsv3 import hpsv3_skeleton

    cfg = Qwen2VLConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
                        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, in_channels=3,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    (tmp_path / "hpsv3").mkdir()
    (tmp_path / "hpsv3" / "config.json").write_text(json.dumps(cfg.to_dict()))
    model, head = hpsv3_skeleton(tmp_path / "hpsv3")
    assert all(p.is_meta for p in model.parameters())
    assert head(torch.zeros(3, 32, device="meta")).shape == (3, 2)
    cls = registry.get("hpsv3")
    with pytest.raises(UserError, match="declared but not measured"):
        cls.check(prompts(2), "suite", "real", cls.make_config({"path": str(tmp_path / "hpsv3")}, "hpsv3"))
    with pytest.raises(UserError, match="GPU-tier"):
        metric("hpsv3", path=str(tmp_path / "hpsv3"))
