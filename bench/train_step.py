"""One BioVLM training step: this project's path against a re-creation of the public reference compute pattern.

Both sides train the same prompt bank (same initial context, same SGD settings) on the same batch of 32 images of an
11-class dataset (organamnist: bank 10 x 11 = 110 prompts) with J attributes per class, and both see the same three
augmented views (plain, weak, strong), generated once as tensors before anything is timed.

Project path (timed step = ``biovlm.methods`` BioVLM ``loss`` + backward + SGD step, exactly what ``biovlm.train.fit``
runs): image features of the three views are computed once beforehand (the feature stage) and looked up; the 110
prompts are truncated to their longest real token sequence; the attribute texts are encoded once and cached;
routing and the teacher are vectorised over the batch.

Reference pattern (``ReferenceBioVLM`` below, written here from the public implementation's compute pattern,
github.com/mainaksingha01/BioVLM): every step runs the image tower three times (plain, weak and strong views),
builds every prompt padded to the text tower's full context (256 tokens for BiomedCLIP), re-encodes every attribute
text (also padded to 256) and selects members for the student and the teacher in per-sample Python loops. It computes
the project's maths (word-embedding prompts, the project's loss terms and reductions), so the two losses must agree;
only the work done differs. The reference's own data loading and augmentation per step are NOT included (that
favours the reference).

Run: ``python bench/train_step.py`` (biomedclip-random, 20-60 min on a 2-core CPU, peak memory ~13 GB from the
reference's 256-token backward). ``--backbone tiny`` checks the same in seconds. The last output line is JSON.
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time

from common import device_name, emit, machine, median, sync, timed

DATASET = "organamnist"  # 11 classes: the bank holds 10 x 11 = 110 prompts
KNOBS = {"bank_size": 10, "n_ctx": 4, "select_ratio": 0.5, "teacher_ratio": 0.5, "tau": 1.0, "l_ent": 0.5,
         "l_kd": 0.25, "l_aug": 0.25, "l_cos": 0.5, "kl_reduction": "batchmean"}
VIEWS = ("plain", "weak", "strong")


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------------------- inputs
def batch_images(size: int, batch_size: int, seed: int = 0):
    """(uint8 images [B, S, S], labels [B]) from a synthetic organamnist twin (written to a temporary folder)."""
    from biovlm import data

    with tempfile.TemporaryDirectory(prefix="biovlm-bench-") as tmp:
        counts = {"train": max(batch_size, 11), "val": 11, "test": 11}
        data.make_synthetic(DATASET, size, counts, seed=seed, root=tmp)
        images, labels = data.load_split(DATASET, "train", size, tmp)
        return images[:batch_size].copy(), labels[:batch_size].copy()


def make_views(backbone, images, seed: int = 0) -> dict:
    """The three augmented views as normalised ``[B, 3, S, S]`` tensors, made once: plain (random resized crop +
    flip), weak (flip), strong (flip + colour jitter + Gaussian blur, jitter on [0, 1] before normalisation)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(seed)
    x = backbone.resize(backbone.images_to_unit(images))
    size = backbone.image_size

    def flip(img):
        return TF.horizontal_flip(img) if torch.rand(()) < 0.5 else img

    plain, weak, strong = [], [], []
    for img in x:
        s, r = float(torch.empty(()).uniform_(0.5, 1.0)), float(torch.empty(()).uniform_(3 / 4, 4 / 3))
        h, w = min(size, round(size * math.sqrt(s / r))), min(size, round(size * math.sqrt(s * r)))
        top, left = int(torch.randint(size - h + 1, ())), int(torch.randint(size - w + 1, ()))
        plain.append(flip(TF.resized_crop(img, top, left, h, w, [size, size], antialias=True).clamp(0, 1)))
        weak.append(flip(img))
        j = flip(img)
        j = TF.adjust_brightness(j, float(torch.empty(()).uniform_(0.6, 1.4)))
        j = TF.adjust_contrast(j, float(torch.empty(()).uniform_(0.6, 1.4)))
        strong.append(TF.gaussian_blur(j, [9, 9], [float(torch.empty(()).uniform_(0.1, 2.0))] * 2))
    return {k: backbone.normalize(torch.stack(v)) for k, v in zip(VIEWS, (plain, weak, strong), strict=True)}


# ---------------------------------------------------------------------------------------------- the reference
class _Clock:
    def __init__(self, device: str):
        self.device, self.laps, self.t = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.laps[name] = now - self.t
        self.t = now


def _n_keep(n: int, ratio: float) -> int:
    return max(1, min(n, math.ceil(ratio * n - 1e-9)))


def _select(member_logits, k: int) -> list[int]:
    """Per-sample selection as the reference does it: entropies to Python, sorted, the k lowest kept."""
    logp = member_logits.log_softmax(dim=-1)
    entropy = (-(logp.exp() * logp).sum(dim=-1)).tolist()
    return sorted(range(len(entropy)), key=lambda m: entropy[m])[:k]  # stable: lower index first among ties


class ReferenceBioVLM:
    """The reference compute pattern of one BioVLM step, computing this project's loss.

    ``ctx`` is a leaf tensor [M, n_ctx, W] (copy of the project's initial bank); texts are tokenized once to the
    full context length (ids only, as a data pipeline would) and everything else happens in ``loss``.
    """

    def __init__(self, backbone, info, class_names, attributes, ctx, knobs: dict, attr_chunk: int = 0):
        import torch

        from biovlm import prompts

        self.bb, self.info, self.knobs = backbone, info, dict(knobs)
        self.ctx = torch.nn.Parameter(ctx.detach().clone())
        self.n_ctx = self.ctx.shape[1]
        pad = self.bb.tokenizer([""])  # the tokenizer pads to the full context length
        self.pad_id = int(pad[0, -1])
        self.prompt_ids = backbone.tokenizer([prompts.context_prompt(n, self.n_ctx) for n in class_names])
        self.j = min(len(a) for a in attributes)
        texts = [prompts.attribute_text(info, n, a) for n, attrs in zip(class_names, attributes, strict=True)
                 for a in attrs[: self.j]]
        self.attr_ids = backbone.tokenizer(texts)  # [C*J, context_length]
        self.attr_chunk = attr_chunk or len(texts)

    def parameters(self):
        return [self.ctx]

    def _encode(self, ids, embeds=None):
        mask = (ids != self.pad_id).long()
        embeds = self.bb.token_embeddings(ids) if embeds is None else embeds
        return self.bb.encode_text_embeddings(embeds, mask)

    def loss(self, views: dict, labels):
        import torch
        import torch.nn.functional as F

        k, bb = self.knobs, self.bb
        clock = _Clock(bb.device.type)
        # 1. the image tower, three passes per step
        with torch.no_grad():
            feats = {v: F.normalize(bb.model.encode_image(views[v]).float(), dim=-1) for v in VIEWS}
        clock.lap("image_tower")
        # 2. all M x C prompts at the full context length (word embeddings, context spliced at 1..n_ctx)
        m, (c, length) = self.ctx.shape[0], self.prompt_ids.shape
        emb = bb.token_embeddings(self.prompt_ids).float()
        width = emb.shape[-1]
        x = torch.cat([emb[None, :, :1].expand(m, c, 1, width), self.ctx[:, None].expand(m, c, self.n_ctx, width),
                       emb[None, :, 1 + self.n_ctx:].expand(m, c, length - 1 - self.n_ctx, width)], dim=2)
        text = self._encode(self.prompt_ids.repeat(m, 1), x.reshape(m * c, length, width))
        text = F.normalize(text.float(), dim=-1).view(m, c, -1)
        clock.lap("prompts_forward")
        # 3. the attribute texts, re-encoded every step
        with torch.no_grad():
            attr = torch.cat([self._encode(self.attr_ids[i:i + self.attr_chunk])
                              for i in range(0, len(self.attr_ids), self.attr_chunk)])
            attr = F.normalize(attr.float(), dim=-1).view(c, self.j, -1)
        classifiers, attr_mean = attr.transpose(0, 1), F.normalize(attr.mean(dim=1), dim=-1)  # [J,C,D], [C,D]
        clock.lap("attributes")
        # 4. per-sample loops: student routing, its entropy, both teachers, both KL terms
        scale, tau = bb.logit_scale, k["tau"]
        k_student, k_teacher = _n_keep(m, k["select_ratio"]), _n_keep(self.j, k["teacher_ratio"])
        k_aug = _n_keep(2 * self.j, k["teacher_ratio"])
        routed, ent, kd, aug = [], [], [], []
        for b in range(labels.shape[0]):
            member = scale * torch.einsum("d,mcd->mc", feats["plain"][b], text)  # [M, C]
            kept = member[_select(member.detach(), k_student)]
            student = kept.mean(dim=0)
            routed.append(student)
            p = kept.softmax(dim=-1).mean(dim=0)
            ent.append(-(p * p.log()).sum())
            log_s = (student / tau).log_softmax(dim=-1)
            with torch.no_grad():
                t_plain = scale * torch.einsum("d,jcd->jc", feats["plain"][b], classifiers)
                t_plain = t_plain[_select(t_plain, k_teacher)].mean(dim=0)
                t_aug = torch.cat([scale * torch.einsum("d,jcd->jc", feats[v][b], classifiers)
                                   for v in ("weak", "strong")])
                t_aug = t_aug[_select(t_aug, k_aug)].mean(dim=0)
            for teacher, out in ((t_plain, kd), (t_aug, aug)):
                p_t = (teacher / tau).softmax(dim=-1)
                out.append((p_t * (p_t.log() - log_s)).sum() * tau**2)
        n = labels.shape[0] * (1 if k["kl_reduction"] == "batchmean" else m * c)
        terms = {"ce": F.cross_entropy(torch.stack(routed), labels), "ent": torch.stack(ent).mean(),
                 "kd": torch.stack(kd).sum() / n, "aug": torch.stack(aug).sum() / n,
                 "cos": 1 - F.cosine_similarity(text.mean(dim=0), attr_mean, dim=-1).mean()}
        weights = {"ce": 1.0, "ent": k["l_ent"], "kd": k["l_kd"], "aug": k["l_aug"], "cos": k["l_cos"]}
        total = sum(weights[t] * v for t, v in terms.items())
        clock.lap("per_sample_loops")
        self.phases = clock.laps  # seconds of each part of the last forward pass
        return total, {"loss": total.item(), **{t: v.item() for t, v in terms.items()}}


# ---------------------------------------------------------------------------------------------- both sides
def build_pair(backbone, n_attributes: int, images, labels, knobs: dict | None = None, seed: int = 0):
    """(project method, its batch of cached features, reference, the view tensors, labels tensor)."""
    import torch

    from biovlm import attributes as attrs
    from biovlm import data
    from biovlm.methods import build_method

    knobs = {**KNOBS, **(knobs or {})}
    info = data.get_dataset(DATASET)
    attributes = [a[:n_attributes] for a in attrs.curated(DATASET)]
    method = build_method("biovlm", backbone, {"biovlm": knobs}, info, attributes=attributes)
    views = {k: v.to(backbone.device) for k, v in make_views(backbone, images, seed).items()}
    labels = torch.as_tensor(labels, dtype=torch.long, device=backbone.device)
    reference = ReferenceBioVLM(backbone, info, method.class_names, method.attributes, method.ctx, knobs)
    return method, views, reference, labels


def cache_features(backbone, views: dict, labels) -> dict:
    """The project's batch: features of the three views, computed once (the feature stage's job)."""
    return {"labels": labels, **{v: backbone.encode_images(views[v]) for v in VIEWS}}


def sgd(params):
    import torch

    from biovlm.train import TRAIN_DEFAULTS as T

    return torch.optim.SGD(params, lr=T["lr"], momentum=T["momentum"], weight_decay=T["weight_decay"])


def project_step(method, batch, opt) -> dict:
    method.train()
    loss, stats = method.loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return stats


def reference_step(reference, views, labels, opt) -> dict:
    loss, stats = reference.loss(views, labels)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(reference.bb.device.type)
    reference.phases["backward_and_step"] = time.perf_counter() - t0
    return {**stats, "phases": dict(reference.phases)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="biomedclip-random")
    ap.add_argument("--device", default="auto", help="auto: cuda when available (both sides run in float32)")
    ap.add_argument("--attributes", type=int, default=5, help="J attributes per class (params.yaml filter.keep)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed steps of the project path, before and again after the reference's")
    ap.add_argument("--ref-repeats", type=int, default=2, help="timed steps of the reference pattern")
    ap.add_argument("--warmup", type=int, default=1, help="untimed project steps before timing")
    ap.add_argument("--ref-warmup", type=int, default=0, help="untimed reference steps before timing")
    ap.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the loss agreement")
    ap.add_argument("--target", type=float, default=30.0, help="speed-up target")
    args = ap.parse_args(argv)

    import torch

    from biovlm.backbone import load_backbone

    torch.manual_seed(0)
    t0 = time.perf_counter()
    device = device_name(args.device)
    backbone = load_backbone(args.backbone, device=device)
    print(f"backbone {args.backbone} loaded in {time.perf_counter() - t0:.1f} s: {backbone}")
    images, labels = batch_images(224, args.batch_size)
    method, views, reference, labels = build_pair(backbone, args.attributes, images, labels)
    c = len(method.class_names)
    print(f"{DATASET}: {c} classes, bank {KNOBS['bank_size']} x {c} = {KNOBS['bank_size'] * c} prompts, "
          f"J = {reference.j} attributes/class ({reference.j * c} texts), batch {args.batch_size}, "
          f"views {tuple(views['plain'].shape)}, context length {backbone.context_length}")

    t0 = time.perf_counter()
    batch = cache_features(backbone, views, labels)
    feature_s = time.perf_counter() - t0
    print(f"project: features of the 3 views computed once in {feature_s:.2f} s (feature stage, not per step)")
    # The project's steps are timed before and after the reference's, so that both see the same mix of machine
    # load (on a shared machine the load drifts over the minutes the reference takes).
    opt = sgd(method.parameters())
    load = [machine()["loadavg_1min"]]
    proj_s, proj_stats = timed(lambda: project_step(method, batch, opt), args.repeats, args.warmup, device,
                               label="project")
    proj_rss = peak_rss_gb()
    load.append(machine()["loadavg_1min"])

    ref_opt = sgd(reference.parameters())
    ref_s, ref_stats = timed(lambda: reference_step(reference, views, labels, ref_opt), args.ref_repeats,
                             args.ref_warmup, device, label="reference")
    ref_rss = peak_rss_gb()
    load.append(machine()["loadavg_1min"])
    after_s, _ = timed(lambda: project_step(method, batch, opt), args.repeats, 0, device, label="project (after)")
    proj_s += after_s
    load.append(machine()["loadavg_1min"])

    # Both start from the same bank and take the same SGD steps, so step i of each sees the same parameters.
    n = min(len(proj_stats), len(ref_stats))
    rel = [abs(p["loss"] - r["loss"]) / max(abs(r["loss"]), 1e-12) for p, r in zip(proj_stats, ref_stats, strict=False)]
    for i in range(n):
        print(f"step {i}: loss project {proj_stats[i]['loss']:.6f}, reference {ref_stats[i]['loss']:.6f} "
              f"(rel diff {rel[i]:.2e})")
    terms = " ".join(f"{t} {proj_stats[0][t]:.5f}/{ref_stats[0][t]:.5f}" for t in ("ce", "ent", "kd", "aug", "cos"))
    print(f"step 0 terms (project/reference): {terms}")
    p_med, r_med = median(proj_s), median(ref_s)
    speedup = r_med / p_med
    same = max(rel) <= args.rtol
    print(f"step time: project {p_med:.3f} s (median of {len(proj_s)}), reference {r_med:.2f} s "
          f"(median of {len(ref_s)}) -> {speedup:.1f}x faster (target >= {args.target:g}x: "
          f"{'met' if speedup >= args.target else 'NOT met'}); same loss within rel {args.rtol:g}: {same}")
    phases = ref_stats[-1]["phases"]
    print("reference step by part (last step, s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print(f"peak RSS: {proj_rss:.2f} GB after the project steps, {ref_rss:.2f} GB after the reference steps; "
          f"1-min load average at the phase boundaries: {load} on {machine()['cores']} cores")
    figures = {"bench": "train_step", "backbone": args.backbone, "dataset": DATASET, "classes": c,
               "prompts": KNOBS["bank_size"] * c, "attributes_per_class": reference.j, "batch_size": args.batch_size,
               "project_step_s": round(p_med, 4), "reference_step_s": round(r_med, 3), "speedup": round(speedup, 1),
               "target_speedup": args.target, "speedup_met": speedup >= args.target,
               "project_loss": proj_stats[0]["loss"], "reference_loss": ref_stats[0]["loss"],
               "max_rel_loss_diff": max(rel), "rtol": args.rtol, "same_loss": same,
               "project_feature_once_s": round(feature_s, 3), "project_times_s": [round(s, 4) for s in proj_s],
               "reference_times_s": [round(s, 3) for s in ref_s],
               "reference_phases_s": {k: round(v, 2) for k, v in phases.items()}, "device": device,
               "peak_rss_gb_project": round(proj_rss, 2),
               "peak_rss_gb_with_reference": round(ref_rss, 2), "loadavg_during": load, "machine": machine()}
    emit(figures)
    return figures


if __name__ == "__main__":
    main()
