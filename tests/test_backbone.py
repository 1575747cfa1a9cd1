from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from biovlm import backbone as bb_module
from biovlm import standins
from biovlm.backbone import BackboneUnavailableError, load_backbone
from biovlm.data import DATASETS
from biovlm.prompts import PLACEHOLDER, attribute_text, context_prompt, template_text

TEXTS = [
    template_text(DATASETS["breastmnist"], "malignant"),
    context_prompt("diabetic retinopathy grade 3", 4),
    attribute_text(DATASETS["pathmnist"], DATASETS["pathmnist"].prompt_names[0], "dense purple nuclei"),
    "Out-of-vocabulary words: Zebrafish, 42 mm!",
    "x",
]



@pytest.fixture(scope="module")
def tiny_clip():
    return load_backbone("tiny-clip")


@pytest.fixture(params=["tiny", "tiny-clip"])
def either(request, tiny_backbone, tiny_clip):
    """Both text-tower kinds: the HF BERT of ``tiny`` and open_clip's native transformer of ``tiny-clip``."""
    return tiny_backbone if request.param == "tiny" else tiny_clip


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _own_encode_text(backbone, ids):
    return F.normalize(backbone.model.encode_text(ids), dim=-1)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: biomedclip, biomedclip-random, tiny, tiny-clip, "
                                         "tiny-pretrained, any '<open_clip arch>/<pretrained tag>'"):
        load_backbone("biomedclip2")
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Q-99'"):
        load_backbone("ViT-Q-99/openai")
    with pytest.raises(ValueError, match="no pretrained tag 'nope' for ViT-B-16; its tags: openai"):
        load_backbone("ViT-B-16/nope")


def test_hub_model_without_network_says_how_to_pre_download(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneUnavailableError) as error:
        load_backbone("biomedclip", cache_dir=tmp_path)
    message = str(error.value)
    assert message.startswith("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224: open_clip_config.json is "
                              "not in the cache, and HF_HUB_OFFLINE is set")
    assert f"searched the Hugging Face cache {tmp_path}" in message and isinstance(error.value, RuntimeError)
    assert "hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in message


def test_prompt_path_equals_the_models_own_encode_text(either):
    full = either.tokenizer(TEXTS)  # padded to the context length, as open_clip's encode_text expects
    assert full.shape == (len(TEXTS), either.context_length)
    ids, mask = either.tokenize(TEXTS)
    ours = either.encode_text_embeddings(either.token_embeddings(ids), mask)
    assert (ours - _own_encode_text(either, full)).abs().max() <= 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_truncation_to_the_longest_real_sequence_changes_nothing(either):
    ids, mask = either.tokenize(TEXTS)
    full = either.tokenizer(TEXTS)
    full_mask = (full != 0).long()
    assert ids.shape[1] == int(full_mask.sum(1).max()) < either.context_length  # cut to the longest real text
    assert torch.equal(ids, full[:, : ids.shape[1]]) and torch.equal(mask, full_mask[:, : ids.shape[1]])
    padded = either.encode_text_embeddings(either.token_embeddings(full), full_mask)
    cut = either.encode_text_embeddings(either.token_embeddings(ids), mask)
    assert (cut - padded).abs().max() <= 1e-5
    alone = either.encode_texts(TEXTS[-1:])  # a short text in a long batch = that text on its own
    assert (alone - cut[-1:]).abs().max() <= 1e-5
    assert (either.encode_texts(TEXTS, batch_size=2) - cut).abs().max() <= 1e-5


def test_every_sequence_starts_with_a_start_token_and_the_placeholder_is_one_token(either):
    ids, mask = either.tokenize([PLACEHOLDER, context_prompt("malignant", 4)])
    assert int(mask[0].sum()) == 3  # start, X, end
    assert ids[0, 0] == ids[1, 0] and len(set(ids[1, 1:5].tolist())) == 1 and ids[1, 1] == ids[0, 1]


def test_gradients_reach_the_embeddings_but_not_the_frozen_towers(either):
    ids, mask = either.tokenize(TEXTS[:2])
    embeds = either.token_embeddings(ids).detach().requires_grad_(True)
    out = either.encode_text_embeddings(embeds, mask)
    out[:, 0].sum().backward()
    assert embeds.grad is not None and embeds.grad[:, 1].abs().sum() > 0
    assert not either.model.training
    assert all(not p.requires_grad and p.grad is None for p in either.model.parameters())
    again = either.encode_text_embeddings(embeds, mask)  # eval mode: no dropout noise
    assert torch.equal(out, again)


def test_images_are_resized_bicubically_grey_repeated_and_normalised(either):
    grey = np.full((2, 28, 28), 128, dtype=np.uint8)
    rgb = np.zeros((3, 28, 28, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    x = either.prepare_images(grey)
    assert x.shape == (2, 3, either.image_size, either.image_size) and x.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(either.mean)) / torch.tensor(either.std)
    torch.testing.assert_close(x[0, :, 5, 7], expected)  # a constant image stays constant under bicubic resizing
    unit = either.resize(either.images_to_unit(rgb))
    assert unit.shape == (3, 3, either.image_size, either.image_size)
    assert unit[:, 1].min() == 1 and unit[:, [0, 2]].max() == 0  # channel order kept, overshoot clamped
    feats = either.encode_images(either.prepare_images(rgb))
    assert feats.shape == (3, either.embed_dim) and not feats.requires_grad
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))


def test_tiny_models_describe_themselves(tiny_backbone, tiny_clip):
    for model, width in ((tiny_backbone, 64), (tiny_clip, 64)):
        assert model.embed_dim == 64 and model.text_width == width and model.image_size == 32
        assert isinstance(model.logit_scale, float) and model.logit_scale == pytest.approx(1 / 0.07)
    assert tiny_backbone.context_length == 128 and tiny_clip.context_length == 77
    assert type(tiny_backbone.model.text).__name__ == "HFTextEncoder"
    assert type(tiny_clip.model).__name__ == "CLIP"  # the class open_clip builds for ViT-B-16/openai
    assert type(tiny_backbone.model.visual.trunk).__name__ == "VisionTransformer"  # a timm ViT, as in BiomedCLIP
    again = load_backbone("tiny")  # deterministic random weights
    assert _same_weights(again.model, tiny_backbone.model)


def test_tiny_vocabulary_covers_every_registry_word_and_any_text(tiny_backbone):
    vocab = standins.tiny_vocab()
    assert vocab == standins.tiny_vocab() and vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    unk = vocab.index("[UNK]")
    ids, _ = tiny_backbone.tokenize(standins.registry_texts())
    assert not (ids == unk).any()
    words = standins._bert_words(standins.registry_texts())
    assert set(words) <= set(vocab) and "x" in vocab
    ids, mask = tiny_backbone.tokenize(["Zebrafish-42 ~{}"])
    assert not (ids == unk).any() and int(mask.sum()) > 5  # unknown words fall back to characters
    padded = standins.tiny_vocab(1000)
    assert len(padded) == 1000 and padded[: len(vocab)] == vocab and padded[-1] == f"[unused{1000 - len(vocab) - 1}]"


def test_biomedclip_random_has_biomedclips_exact_architecture():
    model = load_backbone("biomedclip-random")
    assert (model.embed_dim, model.text_width, model.context_length, model.image_size) == (512, 768, 256, 224)
    trunk, text = model.model.visual.trunk, model.model.text
    assert (trunk.embed_dim, len(trunk.blocks), trunk.patch_embed.patch_size) == (768, 12, (16, 16))
    cfg = text.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (30522, 768, 12, 12)
    assert type(text.pooler).__name__ == "ClsLastHiddenStatePooler" and len(text.proj) == 3  # mlp projection
    assert sum(p.numel() for p in model.model.parameters()) == 195_902_721
    assert model.mean == standins.OPENAI_MEAN and model.std == standins.OPENAI_STD
    ids, mask = model.tokenize(TEXTS[:2])
    ours = model.encode_text_embeddings(model.token_embeddings(ids), mask)
    assert (ours - _own_encode_text(model, model.tokenizer(TEXTS[:2]))).abs().max() <= 1e-5  # 256 tokens


def test_command_line_prepares_named_backbones(capsys):
    bb_module.main(["tiny"])
    out = capsys.readouterr().out
    assert "Backbone('tiny', image_size=32, embed_dim=64" in out
    assert f"weights sha256 {load_backbone('tiny').fingerprint[:16]}" in out
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        bb_module.main(["nope"])


def test_fingerprint_is_a_hash_of_every_weight(tiny_backbone):
    again = load_backbone("tiny")
    assert again.fingerprint == tiny_backbone.fingerprint and len(again.fingerprint) == 64
    with torch.no_grad():
        next(again.model.text.parameters()).view(-1)[0] += 1e-6  # one weight of the text tower
    del again.__dict__["fingerprint"]  # cached per instance
    assert again.fingerprint != tiny_backbone.fingerprint

