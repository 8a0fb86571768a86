"""DeepStream's nvinfer config for one engine: config_infer_primary.txt (key=value INI) and labels.txt.

Every value comes from what Kiln knows of the engine and its model: the network mode from the precision,
the input dims and batch from the engine, scale, offsets and colour order from Kiln's preprocessing
(kiln/preprocess.py: RGB, x/255, no mean), letterbox as maintain-aspect-ratio with symmetric padding,
and the clustering and parse function from the outputs' layout. docs/deploy.md lists the keys only a
DeepStream run on a device can confirm.
"""

from __future__ import annotations

from kiln.specs import base_precision

# nvinfer's network-mode: 0 FP32, 1 INT8, 2 FP16. It has no BF16 or FP8 mode: those engines are strongly
# typed (their types come from the ONNX), so with model-engine-file nvinfer takes them as built; the
# mode only matters where nvinfer builds an engine itself from onnx-file. "best" (all builder precisions)
# is closest to INT8 with FP16 fallback, which nvinfer's INT8 mode builds.
NETWORK_MODES = {"fp32": 0, "int8": 1, "fp16": 2, "best": 1, "bf16": 0, "fp8": 0}

# Parsers for each output layout, and where each comes from (docs/deploy.md).
# Kiln's in-graph NMS (models.<m>.nms: onnx or efficient) has EfficientNMS_TRT's four outputs
# (num_detections, boxes xyxy in network pixels, scores, classes): NVIDIA's TAO apps parse that layout.
PARSERS = {
    "nms": ("NvDsInferParseCustomEfficientNMS",
            "post_processor/libnvds_infercustomparser_tao.so",
            "NVIDIA-AI-IOT/deepstream_tao_apps post_processor/nvdsinfer_custombboxparser_tao.cpp "
            "(EfficientNMS_TRT outputs: num_detections, boxes, scores, classes)"),
    "yolo": ("NvDsInferParseYolo",
             "nvdsinfer_custom_impl_Yolo/libnvdsinfer_custom_impl_Yolo.so",
             "marcoslucianops/DeepStream-Yolo nvdsinfer_custom_impl_Yolo/nvdsparsebbox_Yolo.cpp; it parses the "
             "outputs of that project's export scripts: re-export with them, or use Kiln's in-graph NMS "
             "(models.<m>.nms: onnx), whose outputs need no clustering"),
    "detr": ("NvDsInferParseCustomDETR",
             "libnvds_infercustomparser_kiln_detr.so",
             "a custom parser for DETR-style outputs (labels, boxes xyxy, scores per query): nvinfer has none "
             "built in; marcoslucianops/DeepStream-Yolo parses RT-DETR through its own export "
             "(docs/RTDETR_PyTorch.md)"),
}


def output_kind(spec) -> str:
    """Which parser family the model's outputs need: nms (in-graph NMS), detr (per-query), or yolo (raw head)."""
    if spec.nms != "none":
        return "nms"
    if spec.detection_outputs:
        return "detr"
    return "yolo"


def cluster_mode(spec) -> int:
    """nvinfer's cluster-mode: 2 (NMS) for a raw YOLO head, 4 (none) where the outputs are already detections."""
    return 4 if spec.detection_outputs else 2


def config_text(*, spec, precision: str, batch_size: int, num_classes: int, engine_file: str | None,
                onnx_file: str | None, calib_file: str | None, labels: str = "labels.txt") -> str:
    """config_infer_primary.txt for one engine (paths relative to the config's folder, as nvinfer takes them)."""
    h, w = spec.input_size
    letterbox = spec.preprocess == "letterbox"
    func, lib, origin = PARSERS[output_kind(spec)]
    dec = spec.decode
    lines = [
        f"# DeepStream nvinfer config for {spec.name} ({precision}), written by Kiln's serve stage.",
        f"# Parser: {origin}.",
        "[property]",
        "gpu-id=0",
        # Kiln's preprocessing: RGB, x / 255, no mean (kiln/preprocess.py, kiln/batches.py).
        f"net-scale-factor={1 / 255!r}",
        "offsets=0;0;0",
        "model-color-format=0",
    ]
    if engine_file:
        lines.append(f"model-engine-file={engine_file}")
    if onnx_file:
        lines.append(f"onnx-file={onnx_file}")
    if calib_file:
        lines.append(f"int8-calib-file={calib_file}")
    lines += [
        f"labelfile-path={labels}",
        f"infer-dims=3;{h};{w}",
        f"batch-size={batch_size}",
        f"network-mode={NETWORK_MODES[base_precision(precision)]}",  # int8-mixed is an int8 engine
        f"num-detected-classes={num_classes}",
        "network-type=0",
        "process-mode=1",
        "interval=0",
        "gie-unique-id=1",
        f"maintain-aspect-ratio={int(letterbox)}",
        f"symmetric-padding={int(letterbox)}",
        f"cluster-mode={cluster_mode(spec)}",
        f"parse-bbox-func-name={func}",
        f"custom-lib-path={lib}",
        "",
        "[class-attrs-all]",
        f"pre-cluster-threshold={dec['conf_threshold']}",
        f"topk={dec['max_det']}",
    ]
    if cluster_mode(spec) == 2:
        lines.append(f"nms-iou-threshold={dec['iou_threshold']}")
    return "\n".join(lines) + "\n"
