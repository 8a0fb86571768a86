"""Train the two demo detectors on the procedural shapes dataset, on CPU.

One concern, the demo's training recipe, in one file (hence its length): nothing else in Kiln imports it.

Produces ``models/demo_yolo.pt``, ``models/demo_rtdetr.pt`` (plain state_dicts) and
``models/demo_models.json`` (factory arguments, input contract, training settings
and the validation mAP measured here).  The later pipeline compares every ONNX /
TensorRT variant against those numbers, so evaluation here uses exactly the
workflow's preprocessing (RGB /255, NCHW; letterbox for YOLO, which is the identity
at 256 px, plain resize + ``orig_target_sizes`` for RT-DETR), post-processing
(:mod:`kiln.postprocess`) and metric (:mod:`kiln.metrics`).

Both models share one training recipe: AdamW, warm-up + cosine LR, weight EMA,
dihedral flips (every class is symmetric under them), and the task-aligned
assigner of YOLOv8 for dense supervision.  RT-DETR's decoder queries are matched
one-to-one (Hungarian) so the deploy graph needs no NMS.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kiln.demo.models import RTDETRDemo, YoloDemo, rtdetr_demo, yolo_demo
from kiln.demo.shapes import CLASS_NAMES, generate_split
from kiln.metrics import coco_map
from kiln.postprocess import rtdetr_detections, yolo_detections

# Dataset recipe shared with the workflow (it regenerates val/calib with these).
IMAGE_SIZE = 256
VAL_SPLIT = ("val", 200, 0)
CALIB_SPLIT = ("calib", 64, 0)


# --------------------------------------------------------------------------- data
@dataclass
class Split:
    """A dataset split held in memory: uint8 images and per-image xyxy targets."""

    ann_path: Path
    images: torch.Tensor  # (N, 3, H, W) uint8
    boxes: list[torch.Tensor]  # (n_i, 4) float32 xyxy pixels
    labels: list[torch.Tensor]  # (n_i,) int64, 0-based
    image_ids: list[int]
    category_ids: list[int]


def load_split(ann_path: Path) -> Split:
    """Read a COCO split written by :func:`generate_split` into memory."""
    coco = json.loads(Path(ann_path).read_text())
    cat_ids = [c["id"] for c in coco["categories"]]
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    per_image: dict[int, list[dict]] = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        per_image[a["image_id"]].append(a)
    imgs, boxes, labels, ids = [], [], [], []
    for im in coco["images"]:
        arr = np.array(Image.open(Path(ann_path).parent / "images" / im["file_name"]).convert("RGB"))
        imgs.append(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
        anns = per_image[im["id"]]
        b = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        b[:, 2:] += b[:, :2]  # xywh -> xyxy
        boxes.append(b)
        labels.append(torch.tensor([cat_index[a["category_id"]] for a in anns], dtype=torch.int64))
        ids.append(im["id"])
    return Split(Path(ann_path), torch.stack(imgs), boxes, labels, ids, cat_ids)


def dihedral(img: torch.Tensor, boxes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply element ``k`` (0..7) of the square's symmetry group to a CHW image + xyxy boxes.

    Circles, squares and triangles stay in their class under flips and transposes,
    so this is 8x augmentation for free (and costs only tensor views).
    """
    size = img.shape[-1]
    b = boxes.clone()
    if k & 4:  # transpose: swap x and y
        img = img.transpose(-1, -2)
        b = b[:, [1, 0, 3, 2]]
    if k & 1:  # horizontal flip
        img = img.flip(-1)
        b = torch.stack((size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]), 1)
    if k & 2:  # vertical flip
        img = img.flip(-2)
        b = torch.stack((b[:, 0], size - b[:, 3], b[:, 2], size - b[:, 1]), 1)
    return img, b


def make_batch(
    split: Split, idx: list[int], gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float images (B, 3, H, W) in [0, 1] and padded targets (gt boxes, labels, mask)."""
    imgs, bxs, lbs = [], [], []
    for i in idx:
        img, b = split.images[i], split.boxes[i]
        if gen is not None:
            img, b = dihedral(img, b, int(torch.randint(0, 8, (1,), generator=gen)))
        imgs.append(img)
        bxs.append(b)
        lbs.append(split.labels[i])
    g = max(1, max(len(b) for b in bxs))
    gt_boxes = torch.zeros(len(idx), g, 4)
    gt_labels = torch.zeros(len(idx), g, dtype=torch.int64)
    gt_mask = torch.zeros(len(idx), g, dtype=torch.bool)
    for j, (b, lab) in enumerate(zip(bxs, lbs)):
        gt_boxes[j, : len(b)] = b
        gt_labels[j, : len(b)] = lab
        gt_mask[j, : len(b)] = True
    x = torch.stack(imgs).float().div_(255.0).contiguous(memory_format=torch.channels_last)
    return x, gt_boxes, gt_labels, gt_mask


# --------------------------------------------------------------------------- box ops
def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes, broadcast over leading dims: (..., N, 4) x (..., M, 4) -> (..., N, M)."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter + 1e-9)


def pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of xyxy boxes: (..., N, 4) x (..., M, 4) -> (..., N, M)."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (
        (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)[..., :, None]
        + (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)[..., None, :]
        - inter
        + 1e-9
    )
    hull = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:]) - torch.minimum(
        a[..., :, None, :2], b[..., None, :, :2]
    )
    hull = hull.clamp(min=0).prod(-1) + 1e-9
    return inter / union - (hull - union) / hull


def aligned_iou(a: torch.Tensor, b: torch.Tensor, kind: str = "ciou") -> torch.Tensor:
    """Element-wise IoU / GIoU / CIoU of matching xyxy boxes (..., 4)."""
    eps = 1e-7
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    wa, ha = (a[..., 2] - a[..., 0]).clamp(min=eps), (a[..., 3] - a[..., 1]).clamp(min=eps)
    wb, hb = (b[..., 2] - b[..., 0]).clamp(min=eps), (b[..., 3] - b[..., 1]).clamp(min=eps)
    union = wa * ha + wb * hb - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    clt = torch.minimum(a[..., :2], b[..., :2])
    crb = torch.maximum(a[..., 2:], b[..., 2:])
    cwh = crb - clt
    if kind == "giou":
        carea = cwh.prod(-1) + eps
        return iou - (carea - union) / carea
    # CIoU (YOLOv8's box loss): centre distance and aspect-ratio penalties.
    c2 = cwh.pow(2).sum(-1) + eps
    rho2 = ((a[..., :2] + a[..., 2:]) - (b[..., :2] + b[..., 2:])).pow(2).sum(-1) / 4
    v = (4 / math.pi**2) * (torch.atan(wb / hb) - torch.atan(wa / ha)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)


# --------------------------------------------------------------------------- losses
@torch.no_grad()
def tal_assign(
    scores: torch.Tensor,
    pred_boxes: torch.Tensor,
    points: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_mask: torch.Tensor,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """YOLOv8's task-aligned assigner.

    Candidates are points inside a GT box; each GT takes the ``topk`` candidates by
    ``score^alpha * IoU^beta`` (so assignment follows what the model already predicts
    well), a point claimed by several GTs goes to the one it overlaps most.  Returns
    target boxes (B, A, 4), soft class targets (B, A, C) equal to the normalised
    alignment (IoU-aware scores are what makes conf-ranked mAP high) and fg mask (B, A).
    """
    b, a, c = scores.shape
    g = gt_boxes.shape[1]
    delta = torch.cat(
        (points[None, None] - gt_boxes[:, :, None, :2], gt_boxes[:, :, None, 2:] - points[None, None]), -1
    )
    mask_in = (delta.amin(-1) > 1e-9) & gt_mask[:, :, None]  # (B, G, A)
    cls_scores = scores.transpose(1, 2).gather(1, gt_labels[:, :, None].expand(-1, -1, a))  # (B, G, A)
    ious = pairwise_iou(gt_boxes, pred_boxes).clamp(min=0) * mask_in
    align = cls_scores.pow(alpha) * ious.pow(beta) * mask_in
    k = min(topk, a)
    top_idx = align.topk(k, dim=-1).indices
    mask_top = torch.zeros_like(mask_in).scatter_(-1, top_idx, True)
    mask_pos = mask_top & mask_in
    # Points claimed by several GTs: keep the GT with the highest IoU.
    multi = mask_pos.sum(1) > 1  # (B, A)
    if multi.any():
        best = F.one_hot(ious.argmax(1), g).permute(0, 2, 1).bool()  # (B, G, A)
        mask_pos = torch.where(multi[:, None, :], best & mask_in, mask_pos)
    fg = mask_pos.any(1)  # (B, A)
    gt_idx = mask_pos.float().argmax(1)  # (B, A)
    t_boxes = gt_boxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))
    t_labels = gt_labels.gather(1, gt_idx)
    align = align * mask_pos
    norm = (align * (ious * mask_pos).amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + 1e-9)).amax(1)
    t_scores = F.one_hot(t_labels, c).float() * (norm * fg)[..., None]
    return t_boxes, t_scores, fg


def dense_loss(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    points: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_mask: torch.Tensor,
    box_gain: float = 7.5,
    cls_gain: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """YOLOv8-style loss (BCE on soft targets + CIoU) for per-point predictions.

    ``boxes`` are xyxy in pixels (B, A, 4); gains are YOLOv8's box/cls defaults.
    """
    t_boxes, t_scores, fg = tal_assign(logits.detach().sigmoid(), boxes.detach(), points, gt_boxes, gt_labels, gt_mask)
    norm = t_scores.sum().clamp(min=1.0)
    loss_cls = F.binary_cross_entropy_with_logits(logits, t_scores, reduction="sum") / norm
    if fg.any():
        weight = t_scores.sum(-1)[fg]
        loss_box = ((1.0 - aligned_iou(boxes[fg], t_boxes[fg], "ciou")) * weight).sum() / norm
    else:
        loss_box = boxes.sum() * 0.0
    loss = box_gain * loss_box + cls_gain * loss_cls
    return loss, {"box": float(loss_box.detach()), "cls": float(loss_cls.detach())}


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor, boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_mask: torch.Tensor
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One-to-one query/GT matching with RT-DETR's costs (focal 2, L1 5, GIoU 2).

    ``boxes`` and ``gt_boxes`` are normalised xyxy.  Returns (query_idx, gt_idx) per image.
    """
    from scipy.optimize import linear_sum_assignment

    p = logits.sigmoid()
    alpha, gamma = 0.25, 2.0
    neg = (1 - alpha) * p.pow(gamma) * -(1 - p + 1e-8).log()
    pos = alpha * (1 - p).pow(gamma) * -(p + 1e-8).log()
    cls_cost = (pos - neg).gather(2, gt_labels[:, None, :].expand(-1, p.shape[1], -1))  # (B, Q, G)
    l1 = torch.cdist(_xyxy_to_cxcywh(boxes), _xyxy_to_cxcywh(gt_boxes), p=1)  # RT-DETR: L1 on cxcywh
    giou = pairwise_giou(boxes, gt_boxes)
    cost = (2.0 * cls_cost + 5.0 * l1 - 2.0 * giou).numpy()
    out = []
    for j in range(cost.shape[0]):
        n = int(gt_mask[j].sum())
        if n == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        q_idx, g_idx = linear_sum_assignment(cost[j, :, :n])
        out.append((q_idx.astype(np.int64), g_idx.astype(np.int64)))
    return out


def set_loss(
    logits: torch.Tensor,
    boxes_cxcywh: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """RT-DETR decoder loss: varifocal (IoU-aware) classification + L1 + GIoU, one-to-one.

    ``gt_boxes`` are normalised xyxy.  Loss weights are RT-DETR's (1 / 5 / 2).
    """
    boxes = cxcywh_to_xyxy(boxes_cxcywh)
    matches = hungarian_match(logits.detach(), boxes.detach(), gt_boxes, gt_labels, gt_mask)
    b_idx = torch.cat([torch.full((len(q),), j, dtype=torch.int64) for j, (q, _) in enumerate(matches)])
    q_idx = torch.cat([torch.from_numpy(q) for q, _ in matches])
    g_idx = torch.cat([torch.from_numpy(g) for _, g in matches])
    num = max(1, len(q_idx))
    target = torch.zeros_like(logits)
    if len(q_idx):
        pb, gb = boxes[b_idx, q_idx], gt_boxes[b_idx, g_idx]
        iou = aligned_iou(pb.detach(), gb, "iou").clamp(min=0)
        target[b_idx, q_idx, gt_labels[b_idx, g_idx]] = iou
        loss_l1 = F.l1_loss(boxes_cxcywh[b_idx, q_idx], _xyxy_to_cxcywh(gb), reduction="sum") / num
        loss_giou = (1 - aligned_iou(pb, gb, "giou")).sum() / num
    else:
        loss_l1 = loss_giou = logits.sum() * 0.0
    # Varifocal loss: positives weighted by their IoU target, negatives focally down-weighted.
    p = logits.detach().sigmoid()
    weight = 0.75 * p.pow(2) * (target == 0) + target
    loss_vfl = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / num
    loss = loss_vfl + 5.0 * loss_l1 + 2.0 * loss_giou
    return loss, {"vfl": float(loss_vfl.detach()), "l1": float(loss_l1.detach()), "giou": float(loss_giou.detach())}


def _xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    return torch.cat(((b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]), -1)


def yolo_loss(model: YoloDemo, x: torch.Tensor, gt_boxes, gt_labels, gt_mask) -> tuple[torch.Tensor, dict[str, float]]:
    out = model.forward_raw(x)
    return dense_loss(out["logits"], out["boxes"], out["points"], gt_boxes, gt_labels, gt_mask)


def rtdetr_loss(
    model: RTDETRDemo, x: torch.Tensor, gt_boxes, gt_labels, gt_mask
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dense (one-to-many) loss on encoder tokens + one-to-one loss on each decoder layer."""
    out = model.forward_raw(x)
    h, w = x.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=x.dtype)
    enc_xyxy = cxcywh_to_xyxy(out["enc_boxes"]) * scale
    # Token centres in pixels: the encoder's anchors sit at cell centres.
    points = torch.cat(
        [
            torch.stack(
                torch.meshgrid((torch.arange(h // s) + 0.5) * s, (torch.arange(w // s) + 0.5) * s, indexing="ij")[::-1],
                -1,
            ).reshape(-1, 2)
            for s in model.token_strides
        ]
    ).to(x.dtype)
    loss, logs = dense_loss(out["enc_logits"], enc_xyxy, points, gt_boxes, gt_labels, gt_mask)
    logs = {f"enc_{k}": v for k, v in logs.items()}
    gt_norm = gt_boxes / scale
    for i, (lg, bx) in enumerate(out["aux"]):
        layer_loss, layer_logs = set_loss(lg, bx, gt_norm, gt_labels, gt_mask)
        loss = loss + layer_loss
        if i == len(out["aux"]) - 1:
            logs.update(layer_logs)
    return loss, logs


# --------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 50) -> dict[str, float]:
    """Val mAP with the workflow's exact pre/post-processing (conf 0.001, NMS IoU 0.6)."""
    model.eval()
    dets: list[dict] = []
    for s in range(0, len(split.image_ids), batch_size):
        x = split.images[s : s + batch_size].float() / 255.0
        if isinstance(model, RTDETRDemo):
            n, _, h, w = x.shape
            sizes = torch.tensor([[w, h]] * n, dtype=torch.int64)
            labels, boxes, scores = model(x, sizes)
            dets += rtdetr_detections(labels.numpy(), boxes.numpy(), scores.numpy(), conf_thres=0.001)
        else:
            dets += yolo_detections(model(x).numpy(), conf_thres=0.001, iou_thres=0.6, max_det=300)
    return coco_map(split.ann_path, split.image_ids, dets, split.category_ids)


# --------------------------------------------------------------------------- training
class ModelEMA:
    """Exponential moving average of weights (and BN buffers), warmed up like Ultralytics."""

    def __init__(self, model: nn.Module, decay: float, tau: float) -> None:
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


@dataclass
class TrainConfig:
    """Settings of one model's training run (recorded in demo_models.json)."""

    epochs: int
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    final_lr_fraction: float = 0.05
    ema_decay: float = 0.999
    ema_tau: float = 300.0
    grad_clip: float = 5.0
    seed: int = 0
    augment: str = "dihedral (random flips / transposes)"
    optimizer: str = "AdamW (no decay on norms/biases)"
    eval_every: int = 5
    extra: dict = field(default_factory=dict)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices/kernels; decaying norms and biases just hurts."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("level_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_model(
    name: str,
    model: nn.Module,
    loss_fn: Callable,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, dict[str, float], float]:
    """Train ``model``; returns the EMA model, its final val metrics and seconds spent."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau)
    n = len(train.image_ids)
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    t0 = time.time()
    step = 0
    metrics: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).tolist()
        te = time.time()
        sums: dict[str, float] = {}
        for it in range(steps_per_epoch):
            # Linear warm-up then cosine decay to final_lr_fraction * lr.
            if step < warm:
                f = (step + 1) / warm
            else:
                prog = (step - warm) / max(1, total - warm)
                f = cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * prog))
            for g in opt.param_groups:
                g["lr"] = cfg.lr * f
            x, gb, gl, gm = make_batch(train, perm[it * cfg.batch_size : (it + 1) * cfg.batch_size], gen)
            loss, logs = loss_fn(model, x, gb, gl, gm)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model)
            step += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
        msg = " ".join(f"{k}={v / steps_per_epoch:.4f}" for k, v in sums.items())
        line = f"[{name}] epoch {epoch + 1}/{cfg.epochs} {msg} lr={cfg.lr * f:.2e} {time.time() - te:.1f}s (total {time.time() - t0:.0f}s)"
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            metrics = evaluate(ema.ema, val)
            line += f" val mAP50={metrics['map50']:.4f} mAP50-95={metrics['map50_95']:.4f}"
        log(line)
    elapsed = time.time() - t0
    ema.ema.to(memory_format=torch.contiguous_format)
    return ema.ema, metrics, elapsed


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_state_dict(model: nn.Module, path: Path) -> None:
    """Save a plain, contiguous fp32 state_dict (loadable with weights_only=True)."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see ``scripts/train_demo.py --help``."""
    ap = argparse.ArgumentParser(description="Train the Kiln demo detectors on the procedural shapes dataset (CPU).")
    ap.add_argument("--out-dir", type=Path, default=Path("models"), help="where checkpoints + demo_models.json go")
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the train/val splits are generated (default: a temporary directory, removed afterwards)",
    )
    ap.add_argument("--train-images", type=int, default=2400)
    ap.add_argument("--yolo-epochs", type=int, default=10)
    ap.add_argument("--rtdetr-epochs", type=int, default=14)
    ap.add_argument("--models", default="yolo,rtdetr", help="comma list of models to train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=5, help="evaluate on val every N epochs (and at the end)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="kiln-demo-data-") as tmp:
        # The data is deterministic (the workflow regenerates val/calib itself), so a
        # throwaway directory loses nothing; it lives until training ends because
        # evaluation reads the val annotations json.
        data_dir = args.data_dir if args.data_dir is not None else Path(tmp)
        return _run(args, data_dir, t_all, log)


def _run(args: argparse.Namespace, data_dir: Path, t_all: float, log: Callable[[str], None]) -> int:
    """Generate data, train the requested models, write checkpoints and the manifest."""
    train_ann = generate_split(data_dir / "train", "train", args.train_images, seed=0, image_size=IMAGE_SIZE)
    val_ann = generate_split(
        data_dir / VAL_SPLIT[0], VAL_SPLIT[0], VAL_SPLIT[1], seed=VAL_SPLIT[2], image_size=IMAGE_SIZE
    )
    train, val = load_split(train_ann), load_split(val_ann)
    log(f"data: {len(train.image_ids)} train / {len(val.image_ids)} val images ({time.time() - t_all:.0f}s)")

    manifest_path = args.out_dir / "demo_models.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("models", {})
    manifest["dataset"] = {
        "generator": "kiln.demo.shapes.generate_split",
        "class_names": list(CLASS_NAMES),
        "image_size": IMAGE_SIZE,
        "train": {"split": "train", "num_images": args.train_images, "seed": 0},
        "val": {"split": VAL_SPLIT[0], "num_images": VAL_SPLIT[1], "seed": VAL_SPLIT[2]},
        "calib": {"split": CALIB_SPLIT[0], "num_images": CALIB_SPLIT[1], "seed": CALIB_SPLIT[2]},
    }

    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    specs = {
        "yolo": dict(
            factory=yolo_demo,
            factory_args={"num_classes": len(CLASS_NAMES), "width": 16, "neck_channels": 64},
            loss=yolo_loss,
            cfg=TrainConfig(epochs=args.yolo_epochs, seed=args.seed, eval_every=args.eval_every),
            extra={
                "preprocess": "letterbox",
                "output_format": "yolov8",
                "inputs": {"images": ["B", 3, IMAGE_SIZE, IMAGE_SIZE]},
                "outputs": {"output0": ["B", 4 + len(CLASS_NAMES), "A"]},
                "postprocess": {"conf_thres": 0.001, "iou_thres": 0.6, "max_det": 300},
            },
        ),
        "rtdetr": dict(
            factory=rtdetr_demo,
            factory_args={
                "num_classes": len(CLASS_NAMES),
                "num_queries": 100,
                "num_top_queries": 100,
                "width": 16,
                "hidden_dim": 96,
                "heads": 4,
                "ffn_dim": 256,
                "num_decoder_layers": 2,
            },
            loss=rtdetr_loss,
            cfg=TrainConfig(epochs=args.rtdetr_epochs, seed=args.seed, eval_every=args.eval_every),
            extra={
                "preprocess": "resize",
                "output_format": "rtdetr",
                "inputs": {"images": ["B", 3, IMAGE_SIZE, IMAGE_SIZE], "orig_target_sizes": ["B", 2]},
                "outputs": {"labels": ["B", 100], "boxes": ["B", 100, 4], "scores": ["B", 100]},
                "postprocess": {"conf_thres": 0.001},
            },
        ),
    }
    for name in wanted:
        if name not in specs:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(specs)}")
        spec = specs[name]
        torch.manual_seed(args.seed)
        model = spec["factory"](**spec["factory_args"])
        cfg: TrainConfig = spec["cfg"]
        log(f"[{name}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {cfg.epochs} epochs")
        trained, metrics, secs = train_model(name, model, spec["loss"], train, val, cfg, log)
        ckpt = args.out_dir / f"demo_{name}.pt"
        _save_state_dict(trained, ckpt)
        entry = {
            "factory": f"kiln.demo.models:{spec['factory'].__name__}",
            "factory_args": spec["factory_args"],
            "checkpoint": ckpt.name,
            "checkpoint_sha256": _sha256(ckpt),
            "input_size": [IMAGE_SIZE, IMAGE_SIZE],
            "input_format": "RGB float32 /255 NCHW",
            **spec["extra"],
            "training": {
                **asdict(cfg),
                "train_images": args.train_images,
                "threads": args.threads,
                "seconds": round(secs, 1),
                "torch": torch.__version__,
            },
            "val_metrics": {"map50": round(metrics["map50"], 4), "map50_95": round(metrics["map50_95"], 4)},
        }
        manifest["models"][name] = entry
        args.out_dir.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        log(f"[{name}] saved {ckpt} ({ckpt.stat().st_size / 1e6:.2f} MB) in {secs:.0f}s: {entry['val_metrics']}")
    manifest["total_wall_seconds"] = round(time.time() - t_all, 1)
    if wanted:
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"done in {time.time() - t_all:.0f}s")
    return 0
