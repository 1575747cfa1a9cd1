"""Pretrained backbones from a Hugging Face cache in the hub's exact layout (built here, offline): they load every
weight or fail naming the repo, the file and the cache folder; ``cache_dir`` serves every file."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from biovlm import hub, standins
from biovlm.backbone import BIOMEDBERT_ID, BIOMEDCLIP_ID, BackboneUnavailableError, load_backbone

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_repo(cache: Path, repo: str, files: dict[str, bytes | Path], symlinks: bool = True) -> Path:
    """A repo as huggingface_hub lays it out: blobs/<sha256>, snapshots/<commit>/<file> (a relative symlink to
    the blob, or a copy where symlinks are unavailable) and refs/main holding the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():  # bytes, or a file moved into the blobs (a large checkpoint)
        if isinstance(content, Path):
            with open(content, "rb") as f:
                blob = root / "blobs" / hashlib.file_digest(f, "sha256").hexdigest()
            shutil.move(content, blob)
        else:
            blob = root / "blobs" / hashlib.sha256(content).hexdigest()
            blob.write_bytes(content)
        if symlinks:
            (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
        else:
            shutil.copyfile(blob, snapshot / name)
    return snapshot


def tiny_biomedclip_cache(cache: Path, symlinks: bool = True, with_checkpoint: bool = True,
                          arch: dict = standins.TINY_ARCH) -> dict:
    """BiomedCLIP's two repos holding a model of ``arch`` (default a tiny one of BiomedCLIP's kind: timm ViT + HF
    BERT, the same config keys; ``standins.BIOMEDCLIP_ARCH`` is the real size); returns the checkpoint's state."""
    model, _ = standins._build_local(arch, seed=7)
    state = model.state_dict()
    vocab = standins.tiny_vocab(arch["bert"]["vocab_size"])
    model_cfg = {k: v for k, v in arch.items() if k != "bert"}
    model_cfg["text_cfg"] = {**model_cfg["text_cfg"], "hf_model_name": BIOMEDBERT_ID,
                             "hf_tokenizer_name": BIOMEDBERT_ID}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                         "std": [0.26862954, 0.26130258, 0.27577711]}}
    files = {"open_clip_config.json": json.dumps(config).encode()}
    if with_checkpoint:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(state, cache / "ckpt.bin")
        files["open_clip_pytorch_model.bin"] = cache / "ckpt.bin"
    write_repo(cache, BIOMEDCLIP_ID, files, symlinks)
    bert = {**standins._BERT_COMMON, **arch["bert"], "vocab_size": len(vocab)}
    tokenizer = {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                 "model_max_length": arch["text_cfg"]["context_length"]}
    bert_files = {"config.json": json.dumps(bert).encode(), "vocab.txt": ("\n".join(vocab) + "\n").encode(),
                  "tokenizer_config.json": json.dumps(tokenizer).encode()}
    if not with_checkpoint:  # a full download of BiomedBERT brings its own weights: they must not fill the gap
        bert_files["pytorch_model.bin"] = b"not used"
    write_repo(cache, BIOMEDBERT_ID, bert_files, symlinks)
    return state


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and an empty default cache (HF_HOME): only the cache passed as cache_dir can serve."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-default"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))


@pytest.mark.parametrize("symlinks", [True, False])
def test_biomedclip_loads_every_weight_from_a_hub_cache(offline, tmp_path, symlinks):
    state = tiny_biomedclip_cache(tmp_path / "hub", symlinks)
    model = load_backbone("biomedclip", cache_dir=tmp_path / "hub")
    loaded = model.model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert model.info["weights_file"].endswith("open_clip_pytorch_model.bin")
    texts = ["a breast ultrasound of malignant.", "X X X X benign."]
    ids, mask = model.tokenize(texts)
    full = model.tokenizer(texts)
    assert full.shape[1] == 128 and ids.shape[1] < 128  # prompt path truncated, model's own padded
    own = torch.nn.functional.normalize(model.model.encode_text(full), dim=-1)
    ours = model.encode_text_embeddings(model.token_embeddings(ids), mask)
    assert (ours - own).abs().max() <= 1e-5


def test_a_missing_checkpoint_is_an_error_not_a_half_random_model(offline, tmp_path):
    tiny_biomedclip_cache(tmp_path / "hub", with_checkpoint=False)
    with pytest.raises(BackboneUnavailableError) as error:
        load_backbone("biomedclip", cache_dir=tmp_path / "hub")
    message = str(error.value)
    assert message.startswith(f"{BIOMEDCLIP_ID}: open_clip_model.safetensors or open_clip_pytorch_model.bin is "
                              "not in the cache, and HF_HUB_OFFLINE is set")
    assert f"searched the Hugging Face cache {tmp_path / 'hub'}" in message
    assert f"`hf download {BIOMEDCLIP_ID} open_clip_model.safetensors --cache-dir {tmp_path / 'hub'}`" in message


def test_missing_text_tower_files_name_biomedbert_not_biomedclip(offline, tmp_path):
    tiny_biomedclip_cache(tmp_path / "hub")
    shutil.rmtree(tmp_path / "hub" / f"models--{BIOMEDBERT_ID.replace('/', '--')}")
    with pytest.raises(BackboneUnavailableError, match=rf"^{BIOMEDBERT_ID}: config.json is not in the cache"):
        load_backbone("biomedclip", cache_dir=tmp_path / "hub")


def test_a_complete_cache_needs_no_network_even_without_hf_hub_offline(monkeypatch, tmp_path):
    import huggingface_hub
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    real = huggingface_hub.hf_hub_download

    def recording(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    tiny_biomedclip_cache(tmp_path / "hub")
    load_backbone("biomedclip", cache_dir=tmp_path / "hub")
    assert calls and all(calls)  # every file came from the cache: no request was made


def test_command_line_prints_one_line_for_an_expected_failure(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "biovlm.backbone", "biomedclip"], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m biovlm.backbone: error: {BIOMEDCLIP_ID}: "
                                                   "open_clip_config.json is not in the cache"), proc.stderr
    assert hub.cache_folder(None).name == "hub"


@pytest.mark.slow
def test_full_size_biomedclip_loads_exactly_from_a_hub_cache(offline, tmp_path):
    """BiomedCLIP's exact architecture (a random 196M-parameter checkpoint, about 800 MB) through the same path:
    every weight equal to the checkpoint, the prompt path exact at 256 tokens."""
    state = tiny_biomedclip_cache(tmp_path / "hub", arch=standins.BIOMEDCLIP_ARCH)
    model = load_backbone("biomedclip", cache_dir=tmp_path / "hub")
    loaded = model.model.state_dict()
    assert sum(t.numel() for t in loaded.values() if t.is_floating_point()) >= 195_000_000
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    texts = ["a breast ultrasound of malignant.", "X X X X benign."]
    ids, mask = model.tokenize(texts)
    full = model.tokenizer(texts)
    assert full.shape[1] == model.context_length == 256
    own = torch.nn.functional.normalize(model.model.encode_text(full), dim=-1)
    assert (model.encode_text_embeddings(model.token_embeddings(ids), mask) - own).abs().max() <= 1e-5



def test_an_open_clip_pair_without_its_weights_is_an_error(offline, tmp_path):
    import open_clip

    repo = open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"].strip("/")
    with pytest.raises(BackboneUnavailableError) as error:
        load_backbone("ViT-B-16/openai", cache_dir=tmp_path / "hub")
    message = str(error.value)
    assert message.startswith("could not load ViT-B-16/openai (") and f"`hf download {repo}`" in message
    assert f"searched the cache {tmp_path / 'hub'}" in message
