"""Where a model comes from (``models.<name>.source``) and how it becomes an exportable nn.Module.

* ``torch`` (:mod:`kiln.sources.torch`): a ``module:function`` factory plus a state_dict checkpoint.
* ``ultralytics`` (:mod:`kiln.sources.ultralytics`): an Ultralytics YOLOv8/YOLO11 detect or RT-DETR
  ``.pt`` checkpoint (or a model YAML, random weights), put in Ultralytics' own export mode.
* ``rtdetr`` (:mod:`kiln.sources.rtdetr`): the official RT-DETR / RT-DETRv2 code in the user's
  checkout, wrapped with its postprocessor as its ``tools/export_onnx.py`` does.

Every source returns a module whose ``forward`` takes the layout's inputs and returns its outputs
(see ``ModelSpec.input_names`` / ``head_output_names``); :mod:`kiln.export` traces it.

Checkpoints load with ``torch.load(weights_only=True)``. A checkpoint that needs a full pickle
(Ultralytics' ``.pt`` always does: it pickles the model object) loads only when the model sets
``trust_checkpoint: true``, because unpickling can run any code the file's author put in it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

SOURCES = ("torch", "ultralytics", "rtdetr")
LAYOUTS = {"torch": ("yolo", "rtdetr"), "ultralytics": ("yolo", "ultralytics_rtdetr"), "rtdetr": ("rtdetr",)}


def trust_hint(model_name: str) -> str:
    return (f"set 'models.{model_name}.trust_checkpoint: true' only if you trust where the file comes from "
            f"(a pickle runs code when it is loaded)")


def load_checkpoint(path: str | Path, model_name: str, trust: bool = False) -> Any:
    """``torch.load`` a checkpoint: weights only, or the full pickle when ``trust`` is set.

    Without trust a checkpoint holding objects other than tensors and plain containers is refused
    with the reason and the opt-in; with trust it is unpickled (weights_only=False).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise KilnError(f"checkpoint '{path}' not found: fix 'models.{model_name}.checkpoint'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):
            raise KilnError(
                f"checkpoint '{path}' could not be read by torch.load: it is not a PyTorch checkpoint "
                f"(or it is damaged): fix 'models.{model_name}.checkpoint'"
            ) from None
        if not trust:
            # torch names the class it refused, e.g. "Unsupported global: GLOBAL pkg.Model".
            detail = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), "")
            raise KilnError(
                f"checkpoint '{path}' is not a weights-only state_dict{f' ({detail})' if detail else ''}: Kiln loads "
                f"checkpoints with torch.load(weights_only=True) because a full pickle can run code; "
                f"save model.state_dict() instead, or {trust_hint(model_name)}"
            ) from None
    except Exception as err:  # zip/EOF/format errors from a damaged or foreign file
        raise KilnError(
            f"checkpoint '{path}' could not be read by torch.load ({type(err).__name__}: {err}): "
            f"is it a PyTorch checkpoint, complete and undamaged?".replace("\n", " ")
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise KilnError(f"checkpoint '{path}' could not be unpickled ({type(err).__name__}: {err}) even with "
                        f"'models.{model_name}.trust_checkpoint: true'".replace("\n", " ")) from None


def state_dict_of(obj: Any, path: str | Path, keys=("model", "state_dict", "ema")) -> dict:
    """The state_dict inside a loaded checkpoint: itself, one under ``keys`` (or 'ema'/'module'), or a module's."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in keys:
            inner = obj.get(key)
            if isinstance(inner, dict) and isinstance(inner.get("module"), dict):  # RT-DETR's ema: {'module': ...}
                inner = inner["module"]
            if isinstance(inner, torch.nn.Module):
                return inner.state_dict()
            if isinstance(inner, dict):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        raise KilnError(
            f"checkpoint '{path}' holds no state_dict of tensors: save model.state_dict() "
            f"(or a dict with it under {' or '.join(repr(k) for k in keys)})"
        )
    return obj


def check_model(name: str, m: dict, base: Path, check_paths: bool) -> None:
    """Config-time checks of one model's source keys (the schema has filled defaults)."""
    source = m["source"]
    where = f"config: 'models.{name}"

    def exists(key: str, is_dir: bool = False) -> None:
        value = m[key]
        p = Path(value) if Path(value).is_absolute() else base / value
        if check_paths and not (p.is_dir() if is_dir else p.is_file()):
            raise KilnError(f"{where}.{key}': {'folder' if is_dir else 'file'} '{value}' not found: fix the path "
                            f"(relative to {base.resolve()})")

    def forbid(*keys: str) -> None:
        for key in keys:
            if m.get(key) is not None:
                raise KilnError(f"{where}.{key}' has no meaning for source {source}: remove it")

    if m["layout"] not in LAYOUTS[source]:
        raise KilnError(f"{where}.layout' is {m['layout']!r} but source {source} gives layout "
                        f"{' or '.join(LAYOUTS[source])}: fix 'layout' or 'source'")
    if m["nms"] != "none" and m["layout"] != "yolo":
        raise KilnError(f"{where}.nms' is {m['nms']!r}: NMS is appended to yolo-layout heads only (layout "
                        f"{m['layout']} has no NMS to add): set 'nms: none'")
    if m["nms"] == "efficient":
        raise KilnError(
            f"{where}.nms' is 'efficient': EfficientNMS_TRT is a TensorRT plugin that ONNX Runtime (Kiln's "
            f"reference, precision and CPU stages) cannot run, and TensorRT-RTX has no plugins; every TensorRT "
            f"Kiln builds for (8.5 and newer) parses the ONNX NonMaxSuppression op: use 'nms: onnx'"
        )
    if source == "torch":
        forbid("ultralytics_yaml", "rtdetr_repo", "rtdetr_config")
        if not m.get("factory"):
            raise KilnError(f"{where}.factory' is missing: source torch needs module:function")
        if not m.get("checkpoint"):
            raise KilnError(f"{where}' lacks a required key: 'checkpoint' (source torch needs a state_dict file)")
        exists("checkpoint")
    elif source == "ultralytics":
        forbid("factory", "rtdetr_repo", "rtdetr_config")
        if bool(m.get("checkpoint")) == bool(m.get("ultralytics_yaml")):
            raise KilnError(f"{where}': source ultralytics needs exactly one of 'checkpoint' (a .pt file) and "
                            f"'ultralytics_yaml' (a model YAML, random weights: for tests)")
        if m.get("checkpoint"):
            exists("checkpoint")
            if not m["trust_checkpoint"]:
                raise KilnError(
                    f"{where}.checkpoint': '{m['checkpoint']}' is an Ultralytics checkpoint, which pickles the whole "
                    f"model object, so loading it can run code; Kiln loads only weights-only files by default: "
                    f"{trust_hint(name)}"
                )
        else:
            exists("ultralytics_yaml")
    else:  # rtdetr
        forbid("factory", "ultralytics_yaml")
        for key in ("rtdetr_repo", "rtdetr_config", "checkpoint"):
            if not m.get(key):
                raise KilnError(f"{where}' lacks a required key: '{key}': source rtdetr needs 'rtdetr_repo' (the RT-DETR checkout: "
                                f"rtdetr_pytorch or rtdetrv2_pytorch), 'rtdetr_config' (its YAML) and 'checkpoint'")
        exists("rtdetr_repo", is_dir=True)
        exists("rtdetr_config")
        exists("checkpoint")
        if check_paths:
            repo = Path(m["rtdetr_repo"]) if Path(m["rtdetr_repo"]).is_absolute() else base / m["rtdetr_repo"]
            if not (repo / "src" / "core").is_dir():
                raise KilnError(f"{where}.rtdetr_repo': '{m['rtdetr_repo']}' has no src/core: point it at the folder "
                                f"holding RT-DETR's src/ and tools/ (e.g. RT-DETR/rtdetrv2_pytorch)")


def build_module(spec):
    """The model of ``spec`` in eval mode, ready to trace: forward(inputs) -> the layout's outputs."""
    if spec.source == "ultralytics":
        from kiln.sources import ultralytics

        return ultralytics.build_module(spec)
    if spec.source == "rtdetr":
        from kiln.sources import rtdetr

        return rtdetr.build_module(spec)
    from kiln.sources import torch as torch_source

    return torch_source.build_module(spec)


def params(spec) -> dict:
    """What of the source, beside the config keys, changes the export (code and versions)."""
    if spec.source == "ultralytics":
        from kiln.sources import ultralytics

        return ultralytics.params(spec)
    if spec.source == "rtdetr":
        from kiln.sources import rtdetr

        return rtdetr.params(spec)
    from kiln.fingerprint import file_fingerprint

    return {"factory_code": file_fingerprint(spec.factory.partition(":")[0]) if spec.factory else None}
