"""kiln.precision: fp32/fp16/bf16/int8/fp8 variants of small exported nets, checked in ORT CPU.

Two tiny nets are exported in-test (torch.onnx.export, dynamo=False, opset 17):
* ``conv``: SiLU convs, Resize, Concat, LayerNormalization, MatMul attention with Softmax, a Sigmoid
  score head, TopK and Gather - the op mix of a small detector.
* ``attn``: nn.LayerNorm + nn.MultiheadAttention + Linear + Sigmoid.
Each variant is made once per module (ModelOpt calls cost ~0.3-1 s each after a ~2 s import).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from kiln.backends import ort_capabilities
from kiln.errors import KilnError
from kiln.precision import (
    CALIB_METHODS,
    PrecisionOptions,
    find_output_sigmoids,
    make_variant,
)

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.onnx.quantization")

nn = torch.nn
F = torch.nn.functional

# Cosine floors per precision against the fp32 model on the same input.
# fp16: weights/activations rounded to 11-bit mantissa -> observed > 0.9999.
# int8/fp8: per-tensor activation scales from 16 calibration samples, per-channel weights; random
# weights have no structure to hide the rounding, so error accumulates over 3 convs + attention.
# Observed 0.9995-0.99999; 0.98 keeps a margin while still catching a broken scale (those give <0.9).
MIN_COS = {"fp32": 0.9999, "fp16": 0.99, "int8": 0.98, "fp8": 0.98}


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, 2, 1)
        self.c2 = nn.Conv2d(32, 32, 3, 2, 1)
        self.c3 = nn.Conv2d(64, 32, 1)
        self.ln = nn.LayerNorm(32)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 12)

    def forward(self, x):
        a = self.c1(x)
        a = a * torch.sigmoid(a)  # SiLU: interior Sigmoid, must not be taken for an output one
        b = self.c2(a)
        b = b * torch.sigmoid(b)
        u = F.interpolate(b, scale_factor=2.0, mode="nearest")
        t = self.c3(torch.cat([a, u], 1)).flatten(2).transpose(1, 2)  # B, HW, C
        t = self.proj(self.ln(t))
        t = torch.softmax(t @ t.transpose(1, 2) / 8.0, -1) @ t
        y = self.head(t)
        boxes, scores = y[..., :4], torch.sigmoid(y[..., 4:])
        _, idx = torch.topk(scores.amax(-1), 10, dim=1)
        picked = torch.index_select(boxes[0], 0, idx[0])  # Gather
        return torch.cat([boxes, scores], -1).transpose(1, 2), picked


class AttnBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        h = self.ln(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return torch.sigmoid(self.fc(x + a))


NETS = {
    "conv": (ConvNet, (1, 3, 32, 32), "images", ["out", "picked"]),
    "attn": (AttnBlock, (1, 16, 32), "x", ["y"]),
}
DENSE = {"conv": ["out"], "attn": ["y"]}  # "picked" is a TopK selection: near-ties may reorder


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    torch.manual_seed(0)
    for name, (cls, shape, inp, outs) in NETS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript-exporter deprecation notice
            torch.onnx.export(
                cls().eval(),
                torch.randn(*shape),
                str(d / f"{name}.onnx"),
                dynamo=False,
                opset_version=17,
                input_names=[inp],
                output_names=outs,
            )
    return d


def _inputs(name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    _, shape, inp, _ = NETS[name]
    rng = np.random.default_rng(seed)
    if name == "conv":  # image-like, [0, 1]
        return {inp: rng.random((n, *shape[1:]), dtype=np.float32)}
    return {inp: rng.standard_normal((n, *shape[1:]), dtype=np.float32)}


@pytest.fixture(scope="module")
def variants(src_dir, tmp_path_factory):
    """make(net, precision) -> (path, record, log lines); each made once per module."""
    out = tmp_path_factory.mktemp("variants")
    cache: dict[tuple[str, str], tuple[Path, dict, list[str]]] = {}

    def make(net: str, precision: str):
        if (net, precision) not in cache:
            lines: list[str] = []
            dst = out / f"{net}.{precision}.onnx"
            record = make_variant(
                src_dir / f"{net}.onnx",
                dst,
                PrecisionOptions(precision),
                calib=_inputs(net, 16, seed=1),
                log=lines.append,
            )
            cache[(net, precision)] = (dst, record, lines)
        return cache[(net, precision)]

    make.out_dir = out
    return make


def _types(model: onnx.ModelProto) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(model)
    t = {i.name: i.data_type for i in m.graph.initializer}
    for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        t[v.name] = v.type.tensor_type.elem_type
    return t


def _run(path: Path, feeds: dict[str, np.ndarray], precision: str = "fp32") -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT's "can't constant fold fp16 Sqrt" notices are harmless
    # The highest level the capability probe found to work for this precision (fp8 on 1.31: BASIC).
    level = ort_capabilities.capabilities()[precision].graph_optimization_level or "ORT_ENABLE_ALL"
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds), strict=True))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------------- make


def test_fp32_is_a_byte_copy(src_dir, tmp_path):
    dst = tmp_path / "conv.fp32.onnx"
    rec = make_variant(src_dir / "conv.onnx", dst, PrecisionOptions("fp32"), log=lambda s: None)
    assert dst.read_bytes() == (src_dir / "conv.onnx").read_bytes()
    assert rec["precision"] == "fp32" and rec["tool"] == "copy" and rec["op_delta"] == {}


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "fp8"])
@pytest.mark.parametrize("net", ["conv", "attn"])
def test_variant_is_checker_valid_and_recorded(variants, net, precision):
    path, rec, lines = variants(net, precision)
    onnx.checker.check_model(str(path), full_check=True)
    assert rec["precision"] == precision and rec["tool"] == "modelopt" and rec["tool_version"]
    assert rec["wall_s"] > 0 and rec["io"] == {k: "float" for k in rec["io"]}
    # ModelOpt's INFO chatter and ORT's calibration prints stay out of the log.
    assert len(lines) < 15, lines
    assert not any("Collecting tensor data" in s or "it/s]" in s for s in lines)


@pytest.mark.parametrize("net", ["conv", "attn"])
def test_fp16_has_fp16_weights_and_fp32_io(variants, net):
    path, rec, _ = variants(net, "fp16")
    m = onnx.load(str(path))
    init = Counter(t.data_type for t in m.graph.initializer)
    assert init[onnx.TensorProto.FLOAT16] > 0 and init[onnx.TensorProto.FLOAT] == 0, init
    for v in [*m.graph.input, *m.graph.output]:
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, v.name
    assert rec["added"]["Cast"] > 0 and rec["nodes_by_output_dtype"]["float16"] > 0


def test_bf16_has_bf16_weights_and_opset_22(variants):
    path, rec, _ = variants("conv", "bf16")
    m = onnx.load(str(path))
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in m.graph.initializer)
    assert rec["opset"] == 22  # Conv/MatMul take bfloat16 only from opset 22; AutoCast upgrades
    assert {v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]} == {onnx.TensorProto.FLOAT}


def test_output_sigmoid_found_not_silu(src_dir):
    m = onnx.load(str(src_dir / "conv.onnx"))
    sig = find_output_sigmoids(m)
    assert len(sig) == 1
    assert sum(n.op_type == "Sigmoid" for n in m.graph.node) == 3  # the two SiLU ones are left alone


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_has_qdq_and_fp32_output_sigmoid(variants, precision):
    path, rec, _ = variants("conv", precision)
    m = onnx.load(str(path))
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert rec["quantized_ops"].get("Conv", 0) > 0
    producer = {o: n for n in m.graph.node for o in n.output}
    types = _types(m)
    sigmoids = rec["excluded"]["output_sigmoids"]
    assert sigmoids
    for n in m.graph.node:
        if n.name in sigmoids:
            assert producer[n.input[0]].op_type != "DequantizeLinear"
            assert types[n.input[0]] == onnx.TensorProto.FLOAT and types[n.output[0]] == onnx.TensorProto.FLOAT
        if n.op_type == "TopK":  # ranks scores: the score tail stays unquantized and fp32
            assert producer[n.input[0]].op_type != "DequantizeLinear"
            assert types[n.input[0]] == onnx.TensorProto.FLOAT
    # everything else that is not quantized went to fp16 (TensorRT strongly typed: int8 + fp16)
    assert rec["high_precision_dtype"] == "fp16" and rec["nodes_by_output_dtype"]["float16"] > 0


def test_fp16_keeps_output_sigmoid_fp32_unless_told(src_dir, variants, tmp_path):
    path, rec, _ = variants("conv", "fp16")
    (sig,) = rec["excluded"]["output_sigmoids"]
    assert _types(onnx.load(str(path)))[_sig_out(path, sig)] == onnx.TensorProto.FLOAT
    dst = tmp_path / "conv.fp16.nokeep.onnx"
    make_variant(src_dir / "conv.onnx", dst, PrecisionOptions("fp16", keep_output_sigmoid=False), log=lambda s: None)
    assert _types(onnx.load(str(dst)))[_sig_out(dst, sig)] == onnx.TensorProto.FLOAT16


def _sig_out(path: Path, name: str) -> str:
    return next(n.output[0] for n in onnx.load(str(path)).graph.node if n.name == name)


def test_nodes_to_exclude_matches_whole_names(src_dir, tmp_path):
    # "/c1/Conv" must not also catch other nodes by prefix (ModelOpt's own re.match would).
    dst = tmp_path / "conv.int8.onnx"
    rec = make_variant(
        src_dir / "conv.onnx",
        dst,
        PrecisionOptions("int8", nodes_to_exclude=("/c1/Conv",), calib_method="max"),
        calib=_inputs("conv", 8, seed=2),
        log=lambda s: None,
    )
    assert rec["excluded"]["nodes_matching_patterns"] == ["/c1/Conv"]
    m = onnx.load(str(dst))
    producer = {o: n for n in m.graph.node for o in n.output}
    convs = {n.name: n for n in m.graph.node if n.op_type == "Conv"}

    def weight_fed_by_dq(conv: str) -> bool:
        w = convs[conv].input[1]
        return w in producer and producer[w].op_type == "DequantizeLinear"

    assert not weight_fed_by_dq("/c1/Conv") and weight_fed_by_dq("/c2/Conv") and weight_fed_by_dq("/c3/Conv")
    assert rec["method"] == "max"


# ---------------------------------------------------------------------------------------------- ORT CPU


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8", "bf16"])
@pytest.mark.parametrize("net", ["conv", "attn"])
def test_ort_cpu_runs_variant_close_to_fp32(src_dir, variants, net, precision):
    cap = ort_capabilities.capabilities()[precision]
    if not cap.runs:
        pytest.skip(f"ORT CPU cannot run {precision} here: {cap.note}")
    path, _, _ = variants(net, precision)
    feeds = _inputs(net, 1, seed=7)
    ref = _run(src_dir / f"{net}.onnx", feeds)
    got = _run(path, feeds, precision)
    assert set(got) == set(ref)
    for k in got:
        assert got[k].dtype == np.float32 and got[k].shape == ref[k].shape
        assert np.isfinite(got[k]).all()
    for k in DENSE[net]:
        assert _cos(ref[k], got[k]) > MIN_COS[precision], (k, _cos(ref[k], got[k]))


def _variant_runs(path: Path, level: str) -> bool:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:  # ORT's own error types
        return False
    return True


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8", "fp8"])
def test_ort_cpu_probe_agrees_with_real_variants(src_dir, variants, precision):
    """The capability probe's tiny graph says what a real variant of each net does in this onnxruntime."""
    cap = ort_capabilities.capabilities()[precision]
    for net in NETS:
        path = src_dir / f"{net}.onnx" if precision == "fp32" else variants(net, precision)[0]
        if cap.runs:
            assert _variant_runs(path, cap.graph_optimization_level), (net, cap)
            higher = ort_capabilities.LEVELS[: ort_capabilities.LEVELS.index(cap.graph_optimization_level)]
            for level in higher:  # the probe keeps the highest level that works: those above it fail on net 'attn'
                assert net == "conv" or not _variant_runs(path, level), (net, level, cap)
        else:
            assert not any(_variant_runs(path, lv) for lv in ort_capabilities.LEVELS), (net, cap)


def test_config_check_uses_the_probe(monkeypatch):
    """check_device refuses exactly the precisions the probe says this host's CPU provider cannot run."""
    from kiln.backends import onnxruntime as ort_backend
    from kiln.config import DeviceProfile

    caps = ort_capabilities.capabilities()
    device = next(d for d in _cpu_devices() if d)
    device = DeviceProfile(**{**device.__dict__, "precisions": ("fp32", "fp16", "bf16", "int8", "fp8")})
    problems = ort_backend.check_device(device)
    refused = {p for p in ort_capabilities.PRECISIONS if any(f"precision '{p}'" in x for x in problems)}
    assert refused == {p for p, c in caps.items() if not c.runs}
    # A probe that says otherwise changes the check's answer: the check is the probe's, not a table's.
    flipped = {p: ort_capabilities.Capability(p, not c.runs, c.graph_optimization_level or "ORT_ENABLE_ALL", "test")
               for p, c in caps.items() if p != "fp32"} | {"fp32": caps["fp32"]}
    monkeypatch.setattr(ort_capabilities, "capabilities", lambda provider="CPUExecutionProvider": flipped)
    problems = ort_backend.check_device(device)
    refused_now = {p for p in ort_capabilities.PRECISIONS if any(f"precision '{p}'" in x for x in problems)}
    assert refused_now == {p for p, c in flipped.items() if not c.runs}


def test_probe_cache_is_per_version(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    ort_capabilities.capabilities.cache_clear()
    try:
        first = ort_capabilities.capabilities()
        files = list(tmp_path.glob("ort-capabilities-*.json"))
        assert [f.name for f in files] == [f"ort-capabilities-{ort.__version__}-CPUExecutionProvider-v"
                                           f"{ort_capabilities.PROBE_FORMAT}.json"]
        ort_capabilities.capabilities.cache_clear()
        assert ort_capabilities.capabilities() == first  # read back from the cache file
    finally:
        ort_capabilities.capabilities.cache_clear()


def _cpu_devices():
    from kiln.config import load_file

    cfg = load_file(Path(__file__).resolve().parent.parent / "config.yaml", base=Path(__file__).resolve().parent.parent)
    return [d for d in cfg.devices.values() if d.backend == "onnxruntime"]


# ---------------------------------------------------------------------------------------------- errors


def _listing(*dirs: Path) -> dict[str, list[str]]:
    return {str(d): sorted(p.name for p in d.iterdir()) for d in dirs}


def test_no_files_left_beside_src_or_dst(src_dir, variants):
    for net in NETS:
        for p in ("fp16", "bf16", "int8", "fp8"):
            variants(net, p)
    assert _listing(src_dir)[str(src_dir)] == ["attn.onnx", "conv.onnx"]
    expected = sorted(f"{n}.{p}.onnx" for n in NETS for p in ("fp16", "bf16", "int8", "fp8"))
    assert _listing(variants.out_dir)[str(variants.out_dir)] == expected


@pytest.mark.parametrize(
    "case",
    ["missing", "garbage", "unknown_precision", "bad_method", "no_calib", "wrong_names", "wrong_shape", "no_match"],
)
def test_user_errors_are_kiln_errors_naming_the_file(src_dir, tmp_path, case):
    src = src_dir / "conv.onnx"
    opts, calib = PrecisionOptions("int8"), _inputs("conv", 4, seed=3)
    if case == "missing":
        src = tmp_path / "nope.onnx"
    elif case == "garbage":
        src = tmp_path / "garbage.onnx"
        src.write_bytes(b"this is not protobuf \x00\xff" * 10)
    elif case == "unknown_precision":
        opts = PrecisionOptions("int4")
    elif case == "bad_method":
        opts = PrecisionOptions("int8", calib_method="percentile")
    elif case == "no_calib":
        calib = None
    elif case == "wrong_names":
        calib = {"input": calib["images"]}
    elif case == "wrong_shape":
        calib = {"images": np.zeros((4, 3, 64, 64), np.float32)}
    elif case == "no_match":
        opts = PrecisionOptions("int8", nodes_to_exclude=("/model.22/Sigmoid",))
    out = tmp_path / "out"
    out.mkdir()
    before = _listing(src_dir)
    with pytest.raises(KilnError) as e:
        make_variant(src, out / "v.onnx", opts, calib=calib, log=lambda s: None)
    assert str(src) in str(e.value)
    assert list(out.iterdir()) == [] and _listing(src_dir) == before


def test_modelopt_failure_leaves_old_dst_untouched(src_dir, tmp_path, monkeypatch):
    import modelopt.onnx.quantization as mq

    def boom(**kwargs):
        # Drop an intermediate beside the (scratch) input like ModelOpt does, then fail.
        Path(kwargs["onnx_path"]).with_name("model_named.onnx").write_bytes(b"x")
        raise ValueError("simulated ModelOpt failure")

    monkeypatch.setattr(mq, "quantize", boom)
    dst = tmp_path / "conv.int8.onnx"
    dst.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="simulated ModelOpt failure"):
        make_variant(
            src_dir / "conv.onnx", dst, PrecisionOptions("int8"), calib=_inputs("conv", 4, 3), log=lambda s: None
        )
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.int8.onnx"]
    assert _listing(src_dir)[str(src_dir)] == ["attn.onnx", "conv.onnx"]


def test_calib_methods_are_modelopts():
    assert CALIB_METHODS == ("entropy", "max")


def test_each_rule_fingerprints_only_the_code_it_runs():
    """kiln.fingerprint follows imports: editing quantization must not rerun fp16 variants."""
    from kiln.fingerprint import closure

    cast, quantize = closure("kiln.precision.cast"), closure("kiln.precision.quantize")
    assert "kiln.precision.quantize" not in cast and "kiln.inputs" not in cast
    assert "kiln.precision" not in cast  # the package's __init__ imports both rules
    # Its second pass is AutoCast, from the module below both rules; neither rule imports the other.
    assert "kiln.precision.autocast" in quantize and "kiln.precision.autocast" in cast
    assert "kiln.precision.cast" not in quantize and "kiln.precision.ptq" not in cast
