"""The ONNX side of a build: the model's inputs and the optimization profiles that cover them."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError

# The schema's default for validation.batch_size (schemas/config.schema.yaml). The caller should
# pass the configured value (extra key validation_batch_size); this is only the fallback.
DEFAULT_VALIDATION_BATCH = 8


def onnx_inputs(onnx_path: Path) -> dict[str, list[int | None]]:
    """Graph inputs of an ONNX file (initializers excluded): name -> dims, None where dynamic."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = dims
    return out


def onnx_opset(onnx_path: Path) -> int | None:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def default_profile(
    device, inputs: dict[str, list[int | None]], validation_batch_size: int | None = None, model_spec=None
) -> dict[str, dict[str, list[int]]]:
    """One optimization profile for the model's inputs.

    A dynamic batch axis (axis 0) spans 1 .. max(device.batch_sizes + [validation batch size]),
    optimized for the largest batch the latency measurement times (max(device.batch_sizes)).
    ``orig_target_sizes`` (RT-DETR) is (B, 2). Other dynamic axes of a 4-D image input take the
    model's input_size (H, W) when ``model_spec`` is given; anything else dynamic needs
    ``devices.<d>.profiles``.
    """
    vbs = DEFAULT_VALIDATION_BATCH if validation_batch_size is None else int(validation_batch_size)
    max_b = max([*device.batch_sizes, vbs])
    opt_b = max(device.batch_sizes)
    profile = {}
    for name, dims in inputs.items():
        if name == "orig_target_sizes":
            dims = [dims[0] if dims else None, 2]
        mins, opts, maxs = [], [], []
        for axis, d in enumerate(dims):
            if d is not None:
                mins.append(d), opts.append(d), maxs.append(d)
            elif axis == 0:
                mins.append(1), opts.append(opt_b), maxs.append(max_b)
            elif model_spec is not None and len(dims) == 4 and axis in (2, 3):
                size = int(model_spec.input_size[axis - 2])
                mins.append(size), opts.append(size), maxs.append(size)
            else:
                raise KilnError(
                    f"input '{name}' has a dynamic axis {axis} that Kiln cannot size: give "
                    f"'devices.{device.name}.profiles' with min/opt/max shapes for it"
                )
        profile[name] = {"min": mins, "opt": opts, "max": maxs}
    return profile


def profiles_for(
    device, onnx_path: Path, validation_batch_size: int | None = None, model_spec=None
) -> list[dict[str, dict[str, list[int]]]]:
    """The optimization profiles of a build: ``device.profiles`` checked against the ONNX, or the default."""
    inputs = onnx_inputs(onnx_path)
    if not device.profiles:
        return [default_profile(device, inputs, validation_batch_size, model_spec)]
    out = []
    for k, given in enumerate(device.profiles):
        where = f"'devices.{device.name}.profiles[{k}]'"
        unknown = sorted(set(given) - set(inputs))
        if unknown:
            raise KilnError(f"{where} names {', '.join(unknown)}, not inputs of '{onnx_path}' "
                            f"(its inputs: {', '.join(inputs)}): fix the names")
        prof = {}
        for name, dims in inputs.items():
            if name not in given:
                if any(d is None for d in dims):
                    raise KilnError(f"{where} lacks input '{name}', which has dynamic axes: add its min/opt/max")
                prof[name] = {"min": list(dims), "opt": list(dims), "max": list(dims)}
                continue
            shapes = {key: [int(x) for x in given[name][key]] for key in ("min", "opt", "max")}
            for key, shape in shapes.items():
                if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
                    raise KilnError(f"{where}.{name}.{key} is {shape} but the ONNX input is "
                                    f"{['?' if d is None else d for d in dims]}: match its rank and fixed axes")
            if not all(a <= b <= c for a, b, c in zip(shapes["min"], shapes["opt"], shapes["max"])):
                raise KilnError(f"{where}.{name}: needs min <= opt <= max on every axis")
            prof[name] = shapes
        out.append(prof)
    return out
