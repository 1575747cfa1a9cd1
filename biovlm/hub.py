"""Pretrained open_clip models from the Hugging Face hub that load completely or not at all.

open_clip's own ``hf-hub:`` path only logs a warning when the CLIP checkpoint is missing (and then returns a model
whose image tower and projections are random, its text tower possibly pretrained), ignores ``cache_dir`` for the
Hugging Face text tower's config, and retries the network for every file when offline without
``HF_HUB_OFFLINE=1``. So every file a model needs is resolved here first, in one cache, local copies first and the
network only for what is missing; the model is then built from a temporary folder of those files with
``require_pretrained=True`` and open_clip's strict checkpoint load. A missing file is one error naming the repo,
the file, the cache folder searched and the command that fetches it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TEXT_CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")  # one of them
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")


class BackboneUnavailableError(RuntimeError):
    """Pretrained weights (or a file they need) are neither in the local cache nor downloadable."""


def cache_folder(cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def fetch(repo: str, alternatives: Sequence[str], cache_dir: str | Path | None, required: bool = True,
          network: bool = True) -> Path | None:
    """The local path of the first of ``alternatives`` that ``repo`` has: from the cache if any is there (no
    network at all), else downloaded unless ``HF_HUB_OFFLINE`` is set or ``network`` is False."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache = str(cache_dir) if cache_dir is not None else None
    for filename in alternatives:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache, local_files_only=True))
        except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
            continue
    problem = "not in the cache, and HF_HUB_OFFLINE is set"
    if network and not constants.HF_HUB_OFFLINE:
        for filename in alternatives:
            try:
                return Path(hf_hub_download(repo, filename, cache_dir=cache))
            except EntryNotFoundError:
                continue
            except Exception as error:  # no network, no such repo, access denied: say which
                problem = f"not in the cache, and downloading failed ({type(error).__name__}: {str(error)[:200]})"
                break
        else:
            problem = "not in the repository"
    if not required:
        return None
    names = " or ".join(alternatives)
    folder = cache_folder(cache_dir)
    raise BackboneUnavailableError(
        f"{repo}: {names} is {problem}; searched the Hugging Face cache {folder}. Fetch it on a connected machine: "
        f"`hf download {repo} {alternatives[0]} --cache-dir {folder}` (or the whole repo: `hf download {repo}`), "
        f"copy the cache folder over, and point backbone.cache_dir (or HF_HOME) at it")


def build(model_id: str, cache_dir: str | Path | None = None):
    """``(model, tokenizer)`` of ``hf-hub:<model_id>`` with every pretrained weight loaded, or an error."""
    import open_clip

    config = json.loads(fetch(model_id, (CONFIG_FILE,), cache_dir).read_text())
    weights = fetch(model_id, WEIGHT_FILES, cache_dir)
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    tokenizer_files: list[Path] = []
    if text_cfg.get("hf_model_name"):  # a Hugging Face text tower: its config and tokenizer, from their own repos
        repo = text_cfg["hf_model_name"]
        tokenizer_repo = text_cfg.get("hf_tokenizer_name") or repo
        text_cfg["hf_model_name"] = str(fetch(repo, TEXT_CONFIG_FILES, cache_dir).parent)
        cached = fetch(tokenizer_repo, TOKENIZER_FILES, cache_dir, required=False, network=False)
        tokenizer_files = [cached or fetch(tokenizer_repo, TOKENIZER_FILES, cache_dir)]
        # optional files: downloaded along with a fresh tokenizer, never looked for online in a complete cache
        tokenizer_files += [f for extra in TOKENIZER_EXTRAS
                            if (f := fetch(tokenizer_repo, (extra,), cache_dir, required=False, network=not cached))]
        text_cfg["hf_tokenizer_name"] = str(tokenizer_files[0].parent)
    with tempfile.TemporaryDirectory(prefix="biovlm-hub-") as tmp:
        folder = Path(tmp)  # open_clip's local-dir: config, checkpoint and (for an HF tower) the tokenizer files
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        os.symlink(weights.resolve(), folder / weights.name)
        for file in tokenizer_files:
            os.symlink(file.resolve(), folder / file.name)
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return model, tokenizer, {"weights_file": str(weights)}
