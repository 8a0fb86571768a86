"""The checked configuration as plain data: what every stage reads. Imports nothing of Kiln.

:mod:`kiln.config` reads, checks and builds these from config.yaml (it may import sources,
backends and the op table to check them); stages import only these dataclasses, so a stage's
code fingerprint never covers the checker or the backends it does not use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# "best" is TensorRT < 11's builder mode (all precision flags on the fp32 ONNX), not an ONNX variant.
# "<p>-mixed" is the fallback variant of a strict precision: the regions the sensitivity stage
# ranks most sensitive kept in higher precision (kiln.precision.fallback); "<p>" itself stays strict.
MIXED = "-mixed"
MIXED_PRECISIONS = ("int8-mixed", "fp8-mixed", "fp16-mixed")
PRECISIONS = ("fp32", "fp16", "fp16-mixed", "bf16", "int8", "int8-mixed", "fp8", "fp8-mixed", "best")


def base_precision(precision: str) -> str:
    """The strict precision a variant name stands for: int8 for int8-mixed; a strict name itself.

    Backends, thresholds and capability tables know only the strict names."""
    return precision.removesuffix(MIXED)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    generator: str | None
    seed: int
    image_size: int
    calib_images: str | None
    calib_count: int
    val_images: str | None
    val_annotations: str | None
    val_count: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    factory: str | None
    factory_args: dict
    checkpoint: str
    layout: str
    dataset: str
    input_size: tuple[int, int]
    preprocess: str
    dynamic_batch: bool
    dynamic_hw: bool
    surgery: tuple[str, ...]
    simplify: bool
    decode: dict
    calibration: dict
    # Layer sensitivity (kiln.sensitivity) and the mixed fallback's limit: precisions, max_nodes, images.
    sensitivity: dict = field(default_factory=dict)
    # Model sources (kiln/sources/): a full pickle loads only with trust_checkpoint (it can run code).
    trust_checkpoint: bool = False
    ultralytics_yaml: str | None = None
    rtdetr_repo: str | None = None
    rtdetr_config: str | None = None
    resize_backend: str = "pil"  # pil or cv2 (OpenCV INTER_LINEAR, as Ultralytics): kiln.preprocess
    nms: str = "none"  # NMS appended to a yolo-layout graph by the surgery stage: none, onnx, efficient
    # Where a torch factory's code may come from (trusted_factories): package names, absolute folders.
    trusted_packages: tuple[str, ...] = ("kiln.demo.models",)
    trusted_folders: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("images", "orig_target_sizes") if self.layout == "rtdetr" else ("images",)

    @property
    def head_output_names(self) -> tuple[str, ...]:
        """Outputs of the exported model (before the surgery stage appends NMS)."""
        return ("labels", "boxes", "scores") if self.layout == "rtdetr" else ("output0",)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Outputs of the model's ONNX variants and engines."""
        if self.nms != "none":
            return ("num_detections", "boxes", "scores", "classes")
        return self.head_output_names

    @property
    def detection_outputs(self) -> bool:
        """Outputs are per-image detections (top-k or after NMS), compared by matching, not by cosine."""
        return self.layout in ("rtdetr", "ultralytics_rtdetr") or self.nms != "none"


@dataclass(frozen=True)
class DeviceProfile:
    """A target device: its backend and everything that shapes its engines."""

    name: str
    backend: str
    opset: int
    precisions: tuple[str, ...]
    providers: tuple[str, ...]
    threads: int
    batch_sizes: tuple[int, ...]
    models: tuple[str, ...]
    compute_capability: str | None = None
    tensorrt_min: str | None = None
    tensorrt_max: str | None = None
    jetson: bool = False
    workspace_mb: int | None = None
    builder_optimization_level: int = 3
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    tf32: bool = True
    int8_mode: str = "qdq"
    dla_core: int | None = None
    profiles: tuple = ()
    cluster: dict = field(default_factory=dict)
    # The most concurrent streams validation times on this device (validation.streams above it are dropped).
    max_streams: int = 8
    # Engine precision -> the precision-variant ONNX its backend builds it from (the loader asks the
    # backend once: kiln.backends.Backend.source_precision). fp32 for "best" on TensorRT < 11, say.
    variants: dict = field(default_factory=dict)

    def variant_of(self, precision: str) -> str:
        """The precision-variant ONNX that this device's engine of `precision` is built from."""
        return self.variants.get(precision, precision)


@dataclass(frozen=True)
class KilnConfig:
    """The checked configuration: what every rule and script reads."""

    results: str
    datasets: dict[str, DatasetSpec]
    models: dict[str, ModelSpec]
    devices: dict[str, DeviceProfile]
    validation: dict
    raw: dict = field(repr=False, compare=False)

    def opsets(self, model: str) -> list[int]:
        """Opsets this model is exported at: one per distinct device opset."""
        return sorted({d.opset for d in self.devices.values() if model in d.models})

    def precisions(self, model: str, opset: int) -> list[str]:
        """Precision-variant ONNX files needed of this model at this opset, over every device."""
        # A mixed variant is made even where its engine is built from the strict source: its record holds the
        # kept nodes the build constrains (kiln.backends.tensorrt.constrain_layers).
        wanted = {v for d in self.devices.values() if model in d.models and d.opset == opset
                  for p in d.precisions for v in (d.variant_of(p), *((p,) if p in MIXED_PRECISIONS else ()))}
        return [p for p in PRECISIONS if p in wanted]

    def jobs(self) -> list[tuple[str, str, str]]:
        """Every (device, model, precision) the config asks for, in config order."""
        return [(d.name, m, p) for d in self.devices.values() for m in d.models for p in d.precisions]
