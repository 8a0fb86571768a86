"""Stage `export`: PyTorch checkpoint to ONNX at one opset, checked, byte-reproducible."""

from __future__ import annotations

import importlib
import logging
import pickle
import zipfile
from pathlib import Path

from kiln.config import KilnConfig, ModelSpec
from kiln.errors import KilnError
from kiln.util import atomic_path

log = logging.getLogger(__name__)


def params(cfg: KilnConfig, model: str) -> dict:
    """Everything in the config that changes the exported bytes (tracked by Snakemake)."""
    from kiln.fingerprint import file_fingerprint

    m = cfg.models[model]
    return {
        "source": m.source,
        "factory": m.factory,
        # The model's own code: editing the factory's module re-exports.
        "factory_code": file_fingerprint(m.factory.partition(":")[0]) if m.factory else None,
        "factory_args": m.factory_args,
        "layout": m.layout,
        "input_size": list(m.input_size),
        "dynamic_batch": m.dynamic_batch,
        "dynamic_hw": m.dynamic_hw,
    }


def _factory(spec: ModelSpec):
    module_name, _, func_name = spec.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise KilnError(
            f"config: 'models.{spec.name}.factory': cannot import '{module_name}' ({err}): "
            f"install the package that provides it or fix the module path"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise KilnError(f"config: 'models.{spec.name}.factory': '{module_name}' has no function '{func_name}'")
    return func


def load_state_dict(path: str | Path, model_name: str) -> dict:
    """Load a weights-only checkpoint: a state_dict, or a dict holding one under 'model'/'state_dict'."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise KilnError(f"checkpoint '{path}' not found: fix 'models.{model_name}.checkpoint'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):
            raise KilnError(
                f"checkpoint '{path}' could not be read by torch.load: it is not a PyTorch checkpoint "
                f"(or it is damaged): fix 'models.{model_name}.checkpoint'"
            ) from None
        # torch names the class it refused, e.g. "Unsupported global: GLOBAL pkg.Model".
        detail = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), "")
        raise KilnError(
            f"checkpoint '{path}' is not a weights-only state_dict{f' ({detail})' if detail else ''}: Kiln loads "
            f"checkpoints with torch.load(weights_only=True) because a full pickle can run code; "
            f"save model.state_dict() instead"
        ) from None
    except Exception as err:  # zip/EOF/format errors from a damaged or foreign file
        raise KilnError(
            f"checkpoint '{path}' could not be read by torch.load ({type(err).__name__}: {err}): "
            f"is it a PyTorch checkpoint, complete and undamaged?".replace("\n", " ")
        ) from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise KilnError(
            f"checkpoint '{path}' holds no state_dict of tensors: save model.state_dict() "
            f"(or a dict with it under 'model' or 'state_dict')"
        )
    return obj


def build_module(spec: ModelSpec):
    """Instantiate the model from its factory and load the checkpoint strictly."""
    import torch

    module = _factory(spec)(**spec.factory_args)
    if not isinstance(module, torch.nn.Module):
        raise KilnError(f"config: 'models.{spec.name}.factory' returned {type(module).__name__}, not a torch nn.Module")
    state = load_state_dict(spec.checkpoint, spec.name)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or resized:
        raise KilnError(
            f"checkpoint '{spec.checkpoint}' does not fit 'models.{spec.name}.factory' with its factory_args "
            f"({len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
            f"{len(resized)} of another shape {resized[:2]}): check factory_args (e.g. num_classes) and the checkpoint"
        )
    module.load_state_dict(state, strict=True)
    return module.eval()


def example_inputs(spec: ModelSpec, batch: int = 1) -> tuple:
    """Deterministic example inputs for tracing: the values do not matter, the shapes and dtypes do."""
    import torch

    h, w = spec.input_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, h, w, generator=gen)
    if spec.layout == "rtdetr":
        return images, torch.tensor([[w, h]] * batch, dtype=torch.int64)
    return (images,)


def dynamic_axes(spec: ModelSpec) -> dict:
    axes: dict[str, dict[int, str]] = {}
    img = {}
    if spec.dynamic_batch:
        img[0] = "batch"
    if spec.dynamic_hw:
        img[2], img[3] = "height", "width"
    if img:
        axes["images"] = img
    if spec.dynamic_batch:
        for name in spec.input_names[1:] + spec.output_names:
            axes[name] = {0: "batch"}
    return axes


def export_onnx(spec: ModelSpec, opset: int, out: str | Path) -> dict:
    """Export `spec` at `opset` to `out`; returns a record of what was exported."""
    import onnx
    import torch

    log.info("export %s at opset %d: loading %s", spec.name, opset, spec.checkpoint)
    module = build_module(spec)
    args = example_inputs(spec)
    with atomic_path(out) as tmp:
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=dynamic_axes(spec),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,  # the TorchScript exporter gives stable bytes and honours opset exactly
            )
        model = onnx.load(str(tmp))
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as err:
            raise KilnError(f"export of '{spec.name}' at opset {opset} failed onnx.checker: {err}") from None
        got_in = [i.name for i in model.graph.input]
        got_out = [o.name for o in model.graph.output]
        if got_in != list(spec.input_names) or got_out != list(spec.output_names):
            raise KilnError(
                f"model '{spec.name}' (layout {spec.layout}) exported inputs {got_in} and outputs {got_out}; "
                f"layout {spec.layout} needs {list(spec.input_names)} -> {list(spec.output_names)}: "
                f"check 'models.{spec.name}.layout' and the factory's forward()"
            )
    log.info("export %s: %d nodes written to %s", spec.name, len(model.graph.node), out)
    return {"nodes": len(model.graph.node), "opset": opset}
