"""The configuration: ``conf/`` composed into ``params.yaml`` (as DVC does it), read and validated.

``conf/config.yaml`` holds every knob with its comments, at the values of the published setup; a profile
(``conf/profile/<name>.yaml``: ``paper``, ``demo``, ``project``) overrides some of them. ``dvc exp run`` composes the
two with Hydra (``.dvc/config``: ``hydra.enabled``), applies every ``-S key=value`` last and writes the result to
``params.yaml``, which is what DVC records (``dvc exp show``, ``dvc params diff``) and what the stages read: the
values a run uses are the values DVC shows. ``dvc repro`` runs ``params.yaml`` as it is (the committed one is the
paper profile's composition; ``tests/test_config.py`` keeps them equal).

Every stage calls ``load_config`` first, so a bad value (unknown dataset, method, setting or backbone name,
``select_ratio`` outside (0, 1], shots the data cannot provide, ...) fails in seconds with a message naming the
key and the fix, never deep inside training. This module imports no torch.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

SETTINGS = ("fewshot", "base2new", "crossdata")
METHODS = ("zeroshot", "zeroshot_attr", "coop", "cocoop", "kgcoop", "biomedcoop", "clip_adapter", "linear_probe",
           "biovlm")
# Backbones by name (biovlm.backbone); any "<open_clip architecture>/<pretrained tag>" works too.
BACKBONES = ("biomedclip", "biomedclip-random", "tiny", "tiny-pretrained", "tiny-clip")
KL_REDUCTIONS = ("batchmean", "reference")
ATTRIBUTE_SOURCES = ("reference", "curated", "llm")  # biovlm.attributes.SOURCES (no import: it is not needed here)
CLASS_NAMES = ("reference", "medmnist")  # biovlm.data.CLASS_NAMES
ATTRIBUTE_TEMPLATES = ("reference", "project")  # biovlm.data.ATTRIBUTE_TEMPLATES
PER_RUN_SETTINGS = ("fewshot", "base2new")  # settings that train (crossdata reuses the fewshot runs)
NORMALIZATIONS = ("imagenet", "backbone")  # biovlm.features.NORMALIZATIONS

CONF_DIR = Path("conf")  # the Hydra configuration params.yaml is composed from (beside params.yaml)
# Where the stages read and write (relative to the repository root; dvc.yaml names the same paths).
ATTRIBUTES_DIR = Path("data/attributes")
FILTERED_DIR = Path("data/filtered")
FEATURES_DIR = Path("features")
CHECKPOINTS_DIR = Path("checkpoints")
RESULTS_DIR = Path("results")
METRICS_DIR = Path("metrics")
REPORT_DIR = Path("report")


class ConfigError(ValueError):
    """A value in params.yaml (or an override) that the pipeline cannot run with."""


class ParamsLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, reading floats as YAML 1.2 does: ``1e-06`` and ``5E3`` (what ``dvc exp run -S``
    writes for small and large numbers) are floats, not the strings YAML 1.1 makes of a mantissa without a dot."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


# ----------------------------------------------------------------------------------------------- value rules
def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pos(v: Any) -> bool:
    return _num(v) and v > 0


def _nonneg(v: Any) -> bool:
    return _num(v) and v >= 0


def _ratio(v: Any) -> bool:
    return _num(v) and 0 < v <= 1


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _choice(*options: Any):
    def rule(v: Any) -> bool:
        return v in options

    rule.__doc__ = f"one of {', '.join(map(str, options))}"
    return rule


_EXPECT = {_pos_int: "a positive integer", _nonneg_int: "an integer >= 0", _int: "an integer", _num: "a number",
           _pos: "a number > 0", _nonneg: "a number >= 0", _ratio: "a number in (0, 1]", _str: "a string (may be '')"}

# Knobs of each method (their names and defaults live in biovlm/methods/*.py DEFAULTS; tests/test_config.py
# checks that these lists agree, so a knob added there without a rule here fails CI, not a user's run).
METHOD_KNOBS: dict[str, dict[str, Any]] = {
    "zeroshot": {},
    "zeroshot_attr": {},
    "coop": {"n_ctx": _pos_int, "ctx_init": _str},
    "cocoop": {"n_ctx": _pos_int, "ctx_init": _str, "meta_reduction": _pos_int},
    "kgcoop": {"n_ctx": _pos_int, "ctx_init": _str, "weight": _nonneg},
    "biomedcoop": {"n_ctx": _pos_int, "ctx_init": _str, "sccm_lambda": _nonneg, "kdsp_lambda": _nonneg,
                   "prune_z": _pos, "tau": _pos, "kl_reduction": _choice(*KL_REDUCTIONS)},
    "clip_adapter": {"alpha": _ratio, "reduction": _pos_int},
    "linear_probe": {"C": lambda v: v == "search" or _pos(v), "search_steps": _nonneg_int, "max_iter": _pos_int,
                     "tol": _pos},
    "biovlm": {"bank_size": _pos_int, "n_ctx": _pos_int, "ctx_init": _str, "select_ratio": _ratio,
               "teacher_ratio": _ratio, "tau": _pos, "l_ent": _nonneg, "l_kd": _nonneg, "l_aug": _nonneg,
               "l_cos": _nonneg, "kl_reduction": _choice(*KL_REDUCTIONS)},
}

_SECTION_RULES: dict[str, dict[str, Any]] = {
    "data": {"root": _str, "size": _choice(28, 64, 128, 224), "synthetic": lambda v: isinstance(v, bool),
             "synthetic_n": None, "synthetic_seed": _int, "class_names": _choice(*CLASS_NAMES),
             "attribute_template": _choice(*ATTRIBUTE_TEMPLATES), "template": None},
    "backbone": {"name": _str, "device": _str, "cache_dir": lambda v: v is None or isinstance(v, str),
                 "threads": lambda v: v is None or _pos_int(v)},
    "features": {"views": _pos_int, "batch_size": _pos_int, "seed": _int, "max_shots": _pos_int,
                 "normalize": _choice(*NORMALIZATIONS),
                 "crop_scale": lambda v: (isinstance(v, list) and len(v) == 2 and all(_num(x) for x in v)
                                          and 0 < v[0] <= v[1] <= 1),
                 "jitter_p": lambda v: _num(v) and 0 <= v <= 1, "blur_p": lambda v: _num(v) and 0 <= v <= 1,
                 "blur_kernel": lambda v: _pos_int(v) and v % 2 == 1},
    "fewshot": {"shots": None},
    "base2new": {"shots": _pos_int},
    "crossdata": {"sources": None, "shots": _pos_int},
    "llm": {"source": _choice(*ATTRIBUTE_SOURCES), "model": lambda v: v is None or isinstance(v, str),
            "n": _pos_int, "temperature": _nonneg, "seed": lambda v: v is None or _int(v),
            "max_retries": _nonneg_int, "timeout": _pos, "backoff": _nonneg, "cache_dir": _str},
    "filter": {"keep": _pos_int},
    "executor": {"kind": _choice("local", "ray"), "address": lambda v: v is None or isinstance(v, str),
                 "workers": lambda v: v is None or _pos_int(v), "gpus_per_worker": _nonneg, "cpus_per_worker": _pos,
                 "retries": _nonneg_int, "runtime_env": lambda v: v is None or isinstance(v, dict)},
    "train": {"epochs": _pos_int, "lr": _pos, "momentum": lambda v: _num(v) and 0 <= v < 1,
              "weight_decay": _nonneg, "warmup_epochs": _nonneg_int, "warmup_lr": _nonneg,
              "batch_size": _pos_int, "eval_batch_size": _pos_int, "val_every": _pos_int},
}
OPTIONAL_SECTIONS = ("executor",)  # absent: its defaults (biovlm/executors.py)
_EXPECT_CUSTOM = {"data.size": "one of 28, 64, 128, 224", "data.synthetic": "true or false",
                  "backbone.cache_dir": "null or a folder", "backbone.threads": "null or a positive integer",
                  "llm.model": "null or a model name", "executor.address": "null, auto or ray://<head>:<port>",
                  "executor.workers": "null or a positive integer", "executor.runtime_env": "null or a mapping",
                  "llm.seed": "null or an integer", "train.momentum": "a number in [0, 1)",
                  "linear_probe.C": "'search' or a number > 0",
                  "features.crop_scale": "[low, high] with 0 < low <= high <= 1 (area fractions)",
                  "features.jitter_p": "a probability in [0, 1]", "features.blur_p": "a probability in [0, 1]",
                  "features.blur_kernel": "an odd number of pixels"}


# ----------------------------------------------------------------------------------------------- loading
def _optional(path: str) -> bool:
    """Keys that may be absent from params.yaml: a method's own ``train:`` schedule, its ``per_run`` values
    (``<method>.per_run.<setting>.<dataset or all>``) and their knobs."""
    parts = path.split(".")
    if len(parts) < 2 or parts[0] not in METHOD_KNOBS:
        return False
    rest = parts[1:]
    if rest[0] == "per_run":
        if len(rest) >= 2 and rest[1] not in PER_RUN_SETTINGS:
            return False
        rest = rest[3:]  # the knobs of one per-run overlay, like the method's own
        if not rest:
            return True
        if rest[0] in METHOD_KNOBS[parts[0]] and len(rest) == 1:
            return True
    return rest[0] == "train" and (len(rest) == 1 or (len(rest) == 2 and rest[1] in _SECTION_RULES["train"]))


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """``set_dotted(cfg, "biovlm.select_ratio", 1.0)``: what ``dvc exp run -S biovlm.select_ratio=1.0`` does."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part not in node and _optional(".".join(parts[: i + 1])):
            node[part] = {}
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override {key}={value!r}: {'.'.join(parts[:i + 1])} is not a section of params.yaml")
        node = node[part]
    if parts[-1] not in node and not _optional(key):
        valid = sorted(node) or (sorted(_SECTION_RULES["train"]) if _optional(".".join(parts[:-1])) else [])
        raise ConfigError(f"override {key}={value!r}: params.yaml has no key {key}; "
                          f"valid keys here: {', '.join(valid)}")
    node[parts[-1]] = value


def _conf_stamp(conf_dir: Path) -> tuple:
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(conf_dir.rglob("*.yaml")))


@functools.lru_cache(maxsize=16)
def _compose_text(conf_dir: str, profile: str, stamp: tuple) -> str:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=conf_dir, version_base=None):
            cfg = compose(config_name="config", overrides=[f"profile={profile}"])
    except HydraException as e:
        valid = sorted(p.stem for p in (Path(conf_dir) / "profile").glob("*.yaml"))
        if f"profile/{profile}" in str(e):
            raise ConfigError(f"unknown profile {profile!r}; valid profiles: {', '.join(valid)} (add "
                              f"conf/profile/{profile}.yaml to make one)") from None
        raise ConfigError(f"{conf_dir}: {str(e).splitlines()[0]}") from None
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)  # what DVC writes to params.yaml (dvc.utils.hydra.compose_and_dump)


def compose_text(profile: str = "paper", conf_dir: str | Path = CONF_DIR) -> str:
    """``params.yaml`` as ``dvc exp run -S profile=<profile>`` writes it: Hydra's composition of ``conf/``."""
    conf = Path(conf_dir).resolve()
    if not (conf / "config.yaml").exists():
        raise FileNotFoundError(f"{conf / 'config.yaml'} not found: the configuration params.yaml is composed from "
                                f"(run from the repository root)")
    return _compose_text(str(conf), profile, _conf_stamp(conf))


def compose(profile: str = "paper", conf_dir: str | Path = CONF_DIR) -> dict:
    """The composed configuration of ``profile`` as the stages read it (before validation)."""
    return yaml.load(compose_text(profile, conf_dir), Loader=ParamsLoader)  # noqa: S506 (a SafeLoader)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the leaves by dotted key (lists and empty mappings are leaves, as
    ``dvc exp show`` prints them)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def profile_values(profile: str, conf_dir: str | Path = CONF_DIR) -> dict[str, Any]:
    """The values ``conf/profile/<profile>.yaml`` sets, by dotted key (its leaves, ``profile`` itself aside)."""
    path = Path(conf_dir) / "profile" / f"{profile}.yaml"
    if not path.exists():
        return {}
    tree = yaml.load(path.read_text(), Loader=ParamsLoader) or {}  # noqa: S506 (a SafeLoader)
    return {k: v for k, v in flatten(tree).items() if k != "profile"}


def _has_value(cfg: Mapping, key: str, value: Any) -> bool:
    node: Any = cfg
    try:
        for part in key.split("."):
            node = node[part]
    except (KeyError, TypeError):
        return False
    return node == value


def load_config(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> dict:
    """Read ``params.yaml`` (composed: see the module docstring), apply ``overrides`` and validate everything.

    ``overrides`` are ``dvc exp run -S`` values as a dict of dotted keys; ``{"profile": "demo"}`` composes the demo
    from the ``conf/`` beside ``path`` first, as ``-S profile=demo`` does, and the other keys win over it. The result
    holds ``_profile`` and ``_from_profile`` (the keys whose value is the profile's) for messages.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run from the repository root (where params.yaml lives)")
    overrides = dict(overrides or {})
    conf_dir = path.parent / CONF_DIR
    if "profile" in overrides:
        raw = compose(overrides.pop("profile"), conf_dir)
    else:
        try:
            raw = yaml.load(path.read_text(), Loader=ParamsLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must be a mapping of sections")
    if "profiles" in raw:
        raise ConfigError(f"{path} has a 'profiles' section: profiles now live in conf/profile/<name>.yaml and "
                          f"params.yaml is composed from conf/ (dvc exp run -S profile=<name>); move the overlays "
                          f"there")
    cfg = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    profile = cfg.get("profile", "paper")
    cfg["_profile"] = profile
    cfg["_from_profile"] = [k for k, v in profile_values(profile, conf_dir).items()
                            if k not in overrides and _has_value(cfg, k, v)]
    validate(cfg)
    if os.environ.get("DVC_EXP_NAME"):  # a stage of `dvc exp run`: params.yaml must not change under it
        from biovlm.workspace import check_params

        check_params(path)
    return cfg


# ----------------------------------------------------------------------------------------------- validation
def _where(cfg: Mapping, key: str) -> str:
    """``key``, and the profile file its value came from, if any (``-S key=value`` changes it either way)."""
    touched = cfg.get("_from_profile", ())
    if key in touched or any(t.startswith(f"{key}.") for t in touched):
        return f"{key} (from conf/profile/{cfg['_profile']}.yaml)"
    return key


def _fail(cfg: Mapping, key: str, value: Any, expected: str, hint: str = "") -> None:
    msg = f"params.yaml: {_where(cfg, key)} must be {expected}, got {value!r}"
    raise ConfigError(msg + (f"; {hint}" if hint else ""))


def _check_section(cfg: dict, section: str, rules: Mapping[str, Any], required: bool = True) -> None:
    values = cfg.get(section)
    if values is None and not required:
        return
    if not isinstance(values, dict):
        raise ConfigError(f"params.yaml: section {section!r} is missing or not a mapping")
    unknown = sorted(set(values) - set(rules))
    if unknown:
        raise ConfigError(f"params.yaml: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                          f"valid keys of {section}: {', '.join(sorted(rules)) or '(none)'}")
    for key, rule in rules.items():
        if rule is None or key not in values:
            continue
        if not rule(values[key]):
            dotted = f"{section}.{key}"
            expected = _EXPECT_CUSTOM.get(dotted) or _EXPECT.get(rule) or (rule.__doc__ or "valid")
            _fail(cfg, dotted, values[key], expected)


def _check_overlay(cfg: dict, where: str, values: dict, rules: Mapping[str, Any]) -> None:
    """A method section's (or per-run overlay's) own ``train:`` schedule: train knobs only."""
    own = values.get("train")
    if own is None:
        return
    if not isinstance(own, dict):
        _fail(cfg, f"{where}.train", own, "a mapping of train knobs, e.g. {epochs: 10}")
    _check_section({**cfg, f"{where}.train": own}, f"{where}.train", _SECTION_RULES["train"])


def _check_names(cfg: dict, key: str, valid: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = cfg.get(key)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        _fail(cfg, key, names, f"a non-empty list of {what} names", f"valid names: {', '.join(valid)}")
    unknown = [n for n in names if n not in valid]
    if unknown:
        why = " (multi-label: not part of this single-label benchmark)" if "chestmnist" in unknown else ""
        raise ConfigError(f"params.yaml: unknown {what} name(s) {unknown} in {_where(cfg, key)}{why}; "
                          f"valid names: {', '.join(valid)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"params.yaml: {_where(cfg, key)} lists {dupes} more than once")
    return names


def _check_shots(cfg: dict, key: str, value: Any) -> list[int]:
    shots = value if isinstance(value, list) else [value]
    if not shots or not all(_pos_int(k) for k in shots) or len(set(shots)) != len(shots):
        _fail(cfg, key, value, "distinct positive integers (shots per class)", "e.g. [1, 2, 4, 8, 16]")
    return shots


def validate_backbone_name(name: str) -> None:
    """Known names, or ``<open_clip architecture>/<pretrained tag>`` (checked further when loaded)."""
    if name in BACKBONES or re.fullmatch(r"[\w.\-]+/[\w.\-]+", name or "") or str(name).startswith("hf-hub:"):
        return
    raise ConfigError(f"params.yaml: unknown backbone.name {name!r}; valid names: {', '.join(BACKBONES)}, or an "
                      f"open_clip pair '<architecture>/<pretrained tag>' such as 'ViT-B-16/openai'")


def validate(cfg: dict) -> None:
    """Check every section; raise ``ConfigError`` naming the key, the bad value and the fix."""
    from biovlm.data import DATASETS  # light: numpy and medmnist's info table only

    known = {"profile", "_profile", "_from_profile", "seeds", "datasets", "methods", "settings",
             *_SECTION_RULES, *METHOD_KNOBS}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"params.yaml: unknown top-level key(s) {unknown}; valid: "
                          f"{', '.join(sorted(k for k in known if not k.startswith('_')))}")

    seeds = cfg.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        _fail(cfg, "seeds", seeds, "a non-empty list of distinct integers", "e.g. [1, 2, 3]")
    datasets = _check_names(cfg, "datasets", list(DATASETS), "dataset")
    _check_names(cfg, "methods", METHODS, "method")
    _check_names(cfg, "settings", SETTINGS, "setting")

    for section, rules in _SECTION_RULES.items():
        _check_section(cfg, section, rules, required=section not in OPTIONAL_SECTIONS)
    for method, rules in METHOD_KNOBS.items():
        if cfg.get(method) is None:
            cfg[method] = {}
        _check_section(cfg, method, {**rules, "train": None, "per_run": None})
        _check_overlay(cfg, method, cfg[method], rules)
        per_run = cfg[method].get("per_run")
        if per_run is None:
            continue
        if not isinstance(per_run, dict) or set(per_run) - set(PER_RUN_SETTINGS):
            _fail(cfg, f"{method}.per_run", per_run, f"a mapping keyed by {' or '.join(PER_RUN_SETTINGS)}",
                  "e.g. {fewshot: {dermamnist: {kdsp_lambda: 20.0}}}")
        for setting, entries in per_run.items():
            where = f"{method}.per_run.{setting}"
            if not isinstance(entries, dict) or set(entries) - {"all", *DATASETS}:
                _fail(cfg, where, entries, "a mapping keyed by dataset names or 'all'",
                      f"valid keys: all, {', '.join(DATASETS)}")
            for key, overlay in entries.items():
                if not isinstance(overlay, dict):
                    _fail(cfg, f"{where}.{key}", overlay, f"a mapping of {method} knobs (and train)")
                _check_section({**cfg, f"{where}.{key}": overlay}, f"{where}.{key}", {**rules, "train": None})
                _check_overlay(cfg, f"{where}.{key}", overlay, rules)

    from biovlm.data import check_template

    try:
        check_template(cfg["data"].get("template", "{}"))
    except ValueError as e:
        raise ConfigError(f"params.yaml: {_where(cfg, 'data.template')}: {e}") from None
    validate_backbone_name(cfg["backbone"].get("name"))
    device = cfg["backbone"].get("device", "auto")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(device)):
        _fail(cfg, "backbone.device", device, "auto, cpu, cuda, cuda:<index> or mps")

    fewshot = _check_shots(cfg, "fewshot.shots", cfg["fewshot"].get("shots"))
    sources = cfg["crossdata"].get("sources", "all")
    if sources != "all":
        if not isinstance(sources, list) or not sources:
            _fail(cfg, "crossdata.sources", sources, "'all' or a non-empty list of datasets")
        unknown = [s for s in sources if s not in DATASETS]
        if unknown:
            raise ConfigError(f"params.yaml: unknown dataset name(s) {unknown} in {_where(cfg, 'crossdata.sources')}; "
                              f"valid: 'all' or any of {', '.join(DATASETS)}")
        if "crossdata" in cfg["settings"] and not crossdata_sources(cfg):
            raise ConfigError(f"params.yaml: none of {_where(cfg, 'crossdata.sources')} {sources} is in datasets "
                              f"({', '.join(datasets)}); list sources among the datasets or use 'all'")
    if "crossdata" in cfg["settings"] and len(datasets) < 2:
        raise ConfigError("params.yaml: the crossdata setting needs at least two datasets; add datasets or drop "
                          "crossdata from settings")
    biggest = max(all_shots(cfg))
    pool = cfg["features"]["max_shots"]
    if biggest > pool:
        where = next(k for k, v in (("fewshot.shots", max(fewshot)), ("base2new.shots", cfg["base2new"]["shots"]),
                                    ("crossdata.shots", cfg["crossdata"]["shots"])) if v == biggest)
        _fail(cfg, where, biggest, f"at most features.max_shots = {pool} (the shots the feature cache holds)",
              f"raise features.max_shots to {biggest} or lower {where}")
    biggest = max(biggest, pool)  # the features stage samples max_shots per class

    source, model = cfg["llm"].get("source"), cfg["llm"].get("model")
    if source == "llm" and not model:
        _fail(cfg, "llm.model", model, "a model name when llm.source is llm")
    if source in ("reference", "curated") and model:
        _fail(cfg, "llm.model", model, f"null when llm.source is {source}",
              "set llm.source=llm to query that model, or llm.model=null")
    if cfg["filter"]["keep"] > cfg["llm"]["n"]:
        _fail(cfg, "filter.keep", cfg["filter"]["keep"], f"at most llm.n = {cfg['llm']['n']} (attributes per class)")

    if cfg["data"]["synthetic"]:
        _check_synthetic(cfg, datasets, biggest)


def _check_synthetic(cfg: dict, datasets: list[str], biggest: int) -> None:
    """Synthetic twins hold ``synthetic_n[split]`` images per split, balanced over classes: enough for K shots?"""
    from biovlm.data import DATASETS, SPLITS

    counts = cfg["data"].get("synthetic_n")
    if not isinstance(counts, dict) or set(counts) != set(SPLITS) or not all(_pos_int(v) for v in counts.values()):
        _fail(cfg, "data.synthetic_n", counts, "{train: n, val: n, test: n} with positive image counts per split")
    most = max(DATASETS[d].n_classes for d in datasets)
    widest = max(datasets, key=lambda d: DATASETS[d].n_classes)
    per_class = counts["train"] // most
    if per_class < biggest:
        _fail(cfg, "data.synthetic_n", counts,
              f"large enough for {biggest} shots per class", f"{widest} has {most} classes, so its synthetic train "
              f"split holds {per_class} per class: set data.synthetic_n.train >= {biggest * most} "
              f"or lower the shots")
    if counts["val"] // most < min(biggest, 4):
        _fail(cfg, "data.synthetic_n", counts, f"large enough for {min(biggest, 4)} validation shots per class",
              f"set data.synthetic_n.val >= {min(biggest, 4) * most}")
    if counts["test"] < most:
        _fail(cfg, "data.synthetic_n", counts, f"at least {most} test images (one per class of {widest})")


# ----------------------------------------------------------------------------------------------- derived values
def all_shots(cfg: Mapping) -> list[int]:
    """Every shot count any setting trains with, ascending (the feature pool holds the largest)."""
    shots = set(cfg["fewshot"]["shots"]) if "fewshot" in cfg["settings"] else set()
    if "base2new" in cfg["settings"]:
        shots.add(cfg["base2new"]["shots"])
    if "crossdata" in cfg["settings"]:
        shots.add(cfg["crossdata"]["shots"])
    return sorted(shots or set(cfg["fewshot"]["shots"]))


def crossdata_sources(cfg: Mapping) -> list[str]:
    """The cross-dataset sources: ``crossdata.sources`` ("all" or a list) among the selected datasets (sources
    outside ``datasets`` are skipped, so a smaller dataset list needs no edit of the sources)."""
    sources = cfg["crossdata"].get("sources", "all")
    return list(cfg["datasets"]) if sources == "all" else [s for s in sources if s in cfg["datasets"]]


def method_config(cfg: Mapping, method: str, setting: str | None = None, dataset: str | None = None) -> dict:
    """The config one method trains with: ``cfg`` with the method's knobs in ``cfg[method]`` and the training
    loop's in ``cfg["train"]``. Over the shared values go, in order: the method's own ``train:`` schedule, then
    (for a run of ``setting`` on ``dataset``) its ``per_run.<setting>.all`` and ``per_run.<setting>.<dataset>``
    values, e.g. BiomedCoOp's published per-dataset loss weights."""
    knobs = copy.deepcopy(dict(cfg.get(method) or {}))
    train = {**cfg["train"], **(knobs.pop("train", None) or {})}
    per_run = knobs.pop("per_run", None) or {}
    if setting is not None:
        for key in ("all", dataset):
            overlay = dict((per_run.get(setting) or {}).get(key) or {})
            train.update(overlay.pop("train", None) or {})
            knobs.update(overlay)
    return {**cfg, method: knobs, "train": train}


def raw_dir(cfg: Mapping, dataset: str) -> Path:
    """Folder of one dataset's npz: real files in ``<root>/<ds>``, synthetic twins in ``<root>/<ds>/synthetic``
    (kept apart so that switching profiles never mixes them, and neither is re-downloaded or regenerated)."""
    folder = Path(cfg["data"]["root"]) / dataset
    return folder / "synthetic" if cfg["data"]["synthetic"] else folder


def npz_location(cfg: Mapping, dataset: str):
    """Where ``dataset``'s npz is read and its arrays extracted (a ``biovlm.data.NpzLocation``): in ``raw_dir``, or
    for official files also medmnist's flat layout ``<root>/<name>_<size>.npz``, read in place with its arrays
    extracted into ``data/raw/<dataset>/`` (``biovlm.data.locate_npz``)."""
    from biovlm.data import NpzLocation, locate_npz, npz_path

    if cfg["data"]["synthetic"]:
        folder = raw_dir(cfg, dataset)
        return NpzLocation(npz_path(dataset, cfg["data"]["size"], folder), folder)
    return locate_npz(dataset, cfg["data"]["size"], cfg["data"]["root"])


def dataset_info(cfg: Mapping, dataset: str):
    """The registry entry of ``dataset`` with the prompt names of ``data.class_names`` (default: medmnist's) and the
    attribute wording of ``data.attribute_template`` (default: this project's)."""
    from biovlm.data import PROJECT_TEMPLATE, get_dataset

    return get_dataset(dataset, cfg["data"].get("class_names", "medmnist"),
                       cfg["data"].get("attribute_template", "project"), cfg["data"].get("template", PROJECT_TEMPLATE))


def results_files(results: str | Path, cfg: Mapping, methods: list[str] | None = None) -> list[Path]:
    """The results tables the stages write: ``<results>/<dataset>/<method>.csv`` (the ``train@<dataset>`` stages'
    few-shot and base-to-novel rows) and ``<results>/crossdata/<method>.csv`` (the ``crossdata`` stage's)."""
    methods = list(methods or cfg["methods"])
    folders = [*cfg["datasets"], *(["crossdata"] if "crossdata" in cfg["settings"] else [])]
    return [Path(results) / folder / f"{m}.csv" for folder in folders for m in methods]


def feature_path(dataset: str) -> Path:
    return FEATURES_DIR / f"{dataset}.safetensors"


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu`` (imports torch: call from stages, not at import)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_device(cfg: Mapping) -> str:
    """Apply ``backbone.threads`` and return the device ``backbone.device`` resolves to (imports torch)."""
    import torch

    threads = cfg["backbone"].get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    return resolve_device(cfg["backbone"]["device"])


def describe_profile(cfg: Mapping) -> str:
    """For stage logs: the profile that composed params.yaml (its values: ``conf/profile/<name>.yaml``)."""
    return f"profile {cfg.get('_profile', 'paper')!r}"


def stage_description(doc: str) -> str:
    """A stage's ``--help`` description: its docstring's first paragraph, ``code`` marks as plain `code`."""
    return " ".join(doc.split("\n\n")[0].replace("``", "`").split())


# The folders several stages read, as command-line options: (default, help).
FOLDER_OPTIONS = {
    "features": (FEATURES_DIR, "folder of the feature files"),
    "filtered": (FILTERED_DIR, "folder of the confidence tables"),
    "checkpoints": (CHECKPOINTS_DIR, "folder of the train stages' run files"),
    "results": (RESULTS_DIR, "folder of the results tables"),
}


def stage_parser(name: str, doc: str, *folders: str):
    """The ``argparse`` parser of ``python -m stages.<name>``: its description from ``doc``, ``--params`` and the
    ``folders`` it reads (keys of ``FOLDER_OPTIONS``), each with its default and meaning in ``--help``."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=stage_description(doc))
    ap.add_argument("--params", default="params.yaml",
                    help="the configuration to run (default: params.yaml, composed from conf/ by dvc exp run)")
    for folder in folders:
        default, meaning = FOLDER_OPTIONS[folder]
        ap.add_argument(f"--{folder}", default=str(default), help=f"{meaning} (default: %(default)s)")
    return ap


def stage_main(name: str, main, argv: list[str] | None = None, exit_code: int = 1) -> None:
    """Run a stage's ``main``; a user error (bad value, missing or mismatched file, failed download) exits with
    its message and ``exit_code`` instead of a traceback. ``BIOVLM_DEBUG=1`` shows the traceback."""
    import sys

    try:
        main(argv)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("BIOVLM_DEBUG"):
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        raise SystemExit(exit_code) from None


PARAMS_HEADER = """\
# GENERATED: the composition of conf/ (conf/config.yaml, then conf/profile/<profile>.yaml) that DVC records and the
# stages read. Edit conf/, not this file: `dvc exp run [-S profile=<name>] [-S key=value]` rewrites it (without
# this header), and `python -m biovlm.config` writes the paper profile's again (the committed version).
"""


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m biovlm.config",
                                 description="Write params.yaml: conf/ composed for a profile, as dvc exp run does.")
    ap.add_argument("--profile", default="paper", help="conf/profile/<name>.yaml to compose (default: paper)")
    ap.add_argument("--out", default="params.yaml", help="file to write (default: params.yaml)")
    args = ap.parse_args(argv)
    text = compose_text(args.profile, Path(args.out).parent / CONF_DIR)
    cfg = yaml.load(text, Loader=ParamsLoader)  # noqa: S506 (a SafeLoader)
    validate({**cfg, "_profile": args.profile, "_from_profile": []})
    Path(args.out).write_text(PARAMS_HEADER + text)
    print(f"wrote {args.out} (profile {args.profile!r})")


if __name__ == "__main__":
    stage_main("config", main)
