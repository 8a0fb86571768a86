"""Source ``ultralytics``: YOLOv8 / YOLO11 detect and RT-DETR models of the ``ultralytics`` package.

The model is put in Ultralytics' own export mode, as its exporter (``ultralytics/engine/exporter.py``,
``Exporter.__call__``) does before ``torch.onnx.export``: parameters frozen, ``eval()``, ``float()``,
``fuse()`` (Conv+BatchNorm folding, RepConv re-parameterisation), and on the head (``Detect`` or
``RTDETRDecoder``) ``export = True``, ``format = "onnx"``, ``dynamic``, ``max_det``, ``xyxy = False``
and a reset anchor cache; every C2f block, subclasses included (YOLO11's C3k2, C2fPSA, C2fCIB), uses
its ``forward_split``, as the exporter's ``isinstance(m, C2f)`` does for ONNX. End-to-end heads (``end2end``) are
switched to their one-to-many branch, so every model gives Kiln's raw layouts:

* ``yolo``: ``output0`` (B, 4 + nc, A): cx, cy, w, h in input pixels, then class scores;
* ``ultralytics_rtdetr``: ``output0`` (B, K, 6): cx, cy, w, h normalised to the input (0..1), score,
  class index, the decoder's top-K (K = min(max_det, num_queries)) sorted by score. That is what
  Ultralytics 8.4's ``RTDETRDecoder`` exports; older releases exported (B, 300, 4 + nc) scores per
  class, which :func:`wrap` reduces to the same (B, K, 6) (best class per query).

Weights: a ``.pt`` checkpoint (a full pickle: needs ``trust_checkpoint: true``) loaded by Ultralytics'
``load_checkpoint``, or ``ultralytics_yaml``, a model YAML built with random weights after
``torch.manual_seed(0)`` (for tests and dry runs; ``factory_args`` go to the model class, e.g.
``{nc: 3}``).
"""

from __future__ import annotations

import os
from pathlib import Path

from kiln.errors import KilnError

INSTALL_HINT = "pip install 'kiln[ultralytics]' (or: pip install ultralytics)"
SEED = 0


def _import():
    # Before the first import: no network probe, no pip installs from inside a checkpoint load, quiet.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_VERBOSE", "0")
    try:
        import ultralytics
        from ultralytics.nn import tasks
        from ultralytics.nn.modules import block, head
    except ImportError as err:
        raise KilnError(f"source ultralytics needs the ultralytics package ({err}): {INSTALL_HINT}") from None
    return ultralytics, tasks, head, block


def params(spec) -> dict:
    try:
        from importlib.metadata import version

        v = version("ultralytics")
    except Exception:
        v = None
    return {"ultralytics": v, "seed": SEED if spec.ultralytics_yaml else None}


def _from_yaml(spec, tasks):
    import torch
    import yaml

    path = Path(spec.ultralytics_yaml)
    cfg = yaml.safe_load(path.read_text())
    head = str((cfg.get("head") or [[None, None, None]])[-1][2]) if isinstance(cfg, dict) else ""
    cls = tasks.RTDETRDetectionModel if "RTDETRDecoder" in head else tasks.DetectionModel
    torch.manual_seed(SEED)
    try:
        return cls(str(path), verbose=False, **spec.factory_args)
    except TypeError as err:
        raise KilnError(f"'models.{spec.name}.factory_args' do not fit Ultralytics' {cls.__name__} ({err}): "
                        f"use its keywords, e.g. {{nc: 3}}") from None


def _from_checkpoint(spec, tasks):
    if not spec.trust_checkpoint:
        from kiln.sources import trust_hint

        raise KilnError(f"'{spec.checkpoint}' is an Ultralytics checkpoint (a full pickle): {trust_hint(spec.name)}")
    try:
        model, _ = tasks.load_checkpoint(spec.checkpoint, device="cpu", fuse=False)
    except Exception as err:
        raise KilnError(f"Ultralytics could not load '{spec.checkpoint}' ({type(err).__name__}: {err})"
                        .replace("\n", " ")) from None
    return model


def wrap(model, layout: str, head_module):
    """The traced module: the Ultralytics model in export mode, its output normalised to the layout."""
    import torch

    legacy_rtdetr = layout == "ultralytics_rtdetr" and not hasattr(head_module, "postprocess")

    class _Wrapper(torch.nn.Module):  # the ExportWrapper of the module docstring
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            y = self.model(images)
            if isinstance(y, (list, tuple)):
                y = y[0]
            if legacy_rtdetr:  # (B, Q, 4 + nc) -> best class per query, top-K by score
                boxes, scores = y[..., :4], y[..., 4:]
                best, cls = scores.max(-1)
                k = min(int(head_module.max_det), y.shape[1])
                top, idx = best.topk(k, dim=1)
                boxes = boxes.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
                y = torch.cat([boxes, top.unsqueeze(-1), cls.gather(1, idx).unsqueeze(-1).float()], -1)
            return y

    return _Wrapper().eval()


def build_module(spec):
    """The Ultralytics model in export mode (see the module docstring), wrapped for tracing."""
    import torch

    _, tasks, head, block = _import()
    model = _from_yaml(spec, tasks) if spec.ultralytics_yaml else _from_checkpoint(spec, tasks)
    last = getattr(model, "model", [None])[-1]
    is_rtdetr = isinstance(last, head.RTDETRDecoder)
    if not is_rtdetr and type(last) is not head.Detect:  # Segment, Pose, OBB, ... subclass Detect
        raise KilnError(f"'models.{spec.name}': Kiln exports Ultralytics detection models (YOLOv8/YOLO11 Detect head, "
                        f"RT-DETR decoder); this one has a {type(last).__name__} head")
    want = "ultralytics_rtdetr" if is_rtdetr else "yolo"
    if spec.layout != want:
        raise KilnError(f"'models.{spec.name}.layout' is {spec.layout!r} but this Ultralytics model "
                        f"({type(last).__name__} head) exports layout {want!r}: set 'layout: {want}'")

    # As Exporter.__call__ prepares a model before torch.onnx.export (ultralytics/engine/exporter.py).
    if hasattr(model, "end2end"):
        model.end2end = False  # one-to-many branch: the raw (B, 4 + nc, A) layout, NMS outside
    for p in model.parameters():
        p.requires_grad = False
    model.eval()
    model.float()
    model = model.fuse(verbose=False)
    h, w = spec.input_size
    dynamic = bool(spec.dynamic_batch or spec.dynamic_hw)
    for m in model.modules():
        if isinstance(m, (head.Detect, head.RTDETRDecoder)):
            m.dynamic = dynamic
            m.export = True
            m.format = "onnx"
            available = (m.num_queries if isinstance(m, head.RTDETRDecoder)
                         else sum(int(h / s) * int(w / s) for s in model.stride.tolist()))
            m.max_det = min(int(spec.decode["max_det"]), available)
            m.agnostic_nms = False
            m.xyxy = False
            m.shape = None
        elif isinstance(m, block.C2f):  # C3k2, C2fPSA, C2fCIB too: Split instead of Chunk + Slice nodes
            m.forward = m.forward_split
    with torch.no_grad():
        model(torch.zeros(1, 3, h, w))  # dry run, as the exporter does (builds anchor caches)
    wrapped = wrap(model, spec.layout, last)
    # What the exporter writes into the ONNX's metadata_props and the checkpoint knows (kiln.export).
    wrapped.kiln_metadata = {"stride": int(max(model.stride)), "task": getattr(model, "task", "detect"),
                             "names": {int(k): str(v) for k, v in dict(model.names).items()}}
    return wrapped


def num_classes(spec, base) -> tuple[int, str] | None:
    """``nc`` of the model YAML (factory_args ``nc`` overriding it), or the one a checkpoint's pickle records."""
    import yaml

    from kiln.sources import checkpoint_head

    if spec.ultralytics_yaml:
        if isinstance(spec.factory_args.get("nc"), int):
            return spec.factory_args["nc"], f"'models.{spec.name}.factory_args.nc'"
        cfg = yaml.safe_load((Path(base) / spec.ultralytics_yaml).read_text())
        nc = cfg.get("nc") if isinstance(cfg, dict) else None
        return (nc, f"'{spec.ultralytics_yaml}' nc") if isinstance(nc, int) else None
    return checkpoint_head(spec, Path(base))
