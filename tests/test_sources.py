"""Model sources (kiln/sources/): checkpoint trust, the torch factory, and the official RT-DETR wrapper.

The RT-DETR source is tested against a stand-in checkout written here with the shape of
lyuwenyu/RT-DETR's rtdetrv2_pytorch (``src/core`` with ``YAMLConfig``, a model and a postprocessor
with ``deploy()``, checkpoints holding ``ema.module``); the real repository is not available on
this host (no network), so the real models were not run.
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_config

from kiln import export, sources
from kiln.config import load
from kiln.errors import KilnError


@pytest.fixture
def yolo_spec(config_dict, tmp_path):
    from kiln.demo.models import yolo_demo

    torch.manual_seed(0)
    net = yolo_demo(num_classes=3)
    torch.save(net.state_dict(), tmp_path / "state.pt")
    torch.save(net, tmp_path / "pickled.pt")  # the whole module: a full pickle
    config_dict["models"]["yolo_demo"]["checkpoint"] = str(tmp_path / "state.pt")
    return load(config_dict, check_paths=False).models["yolo_demo"], net


def test_full_pickle_refused_without_trust_with_reason_and_opt_in(yolo_spec, tmp_path):
    spec, _ = yolo_spec
    pickled = replace(spec, checkpoint=str(tmp_path / "pickled.pt"))
    with pytest.raises(KilnError) as err:
        export.export_onnx(pickled, 17, tmp_path / "x.onnx")
    msg = str(err.value)
    assert "torch.load(weights_only=True) because a full pickle can run code" in msg
    assert "Unsupported global" in msg  # torch names the class it refused
    assert "set 'models.yolo_demo.trust_checkpoint: true' only if you trust where the file comes from" in msg
    assert not (tmp_path / "x.onnx").exists()


def test_full_pickle_loads_with_trust_and_matches_state_dict_export(yolo_spec, tmp_path):
    spec, net = yolo_spec
    trusted = replace(spec, checkpoint=str(tmp_path / "pickled.pt"), trust_checkpoint=True)
    export.export_onnx(trusted, 17, tmp_path / "a.onnx")
    export.export_onnx(spec, 17, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_trust_is_per_model_and_recorded_in_export_params(config_dict):
    config_dict["models"]["yolo_demo"]["trust_checkpoint"] = True
    cfg = load(config_dict, check_paths=False)
    assert cfg.models["yolo_demo"].trust_checkpoint and not cfg.models["rtdetr_demo"].trust_checkpoint
    assert export.params(cfg, "yolo_demo")["trust_checkpoint"] is True
    assert "trust_checkpoint" not in export.params(cfg, "rtdetr_demo")  # unchanged params: no re-export


def test_weights_only_checkpoint_with_plain_containers_needs_no_trust(tmp_path):
    t = {"model": {"w": torch.ones(2)}, "epoch": 3, "args": {"lr": 0.1}}
    torch.save(t, tmp_path / "c.pt")
    assert sources.state_dict_of(sources.load_checkpoint(tmp_path / "c.pt", "m"), tmp_path / "c.pt").keys() == {"w"}
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    with pytest.raises(KilnError, match="argparse.Namespace"):
        sources.load_checkpoint(tmp_path / "ns.pt", "m")
    assert sources.load_checkpoint(tmp_path / "ns.pt", "m", trust=True)["args"].lr == 0.1


@pytest.mark.parametrize("change, message", [
    ({"source": "ultralytics"}, r"'models.yolo_demo.factory' has no meaning for source ultralytics"),
    ({"nms": "onnx", "layout": "rtdetr"}, r"NMS is appended to yolo-layout heads only"),
    ({"nms": "efficient"}, r"EfficientNMS_TRT is a TensorRT plugin that ONNX Runtime .* use 'nms: onnx'"),
    ({"source": "rtdetr", "factory": None, "layout": "rtdetr"}, r"lacks a required key: 'rtdetr_repo'"),
    ({"ultralytics_yaml": "x.yaml"}, r"'models.yolo_demo.ultralytics_yaml' has no meaning for source torch"),
])
def test_source_keys_checked_at_load(config_dict, change, message):
    m = config_dict["models"]["yolo_demo"]
    for k, v in change.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    with pytest.raises(KilnError, match=message):
        load(config_dict, check_paths=False)


def test_nms_on_a_device_that_cannot_build_it_is_refused(config_dict):
    config_dict["models"]["yolo_demo"]["nms"] = "onnx"
    with pytest.raises(KilnError, match=r"'devices.rtx' builds model 'yolo_demo', whose nms: onnx appends "
                                        r"NonMaxSuppression, which TensorRT-RTX cannot build"):
        load(config_dict, check_paths=False)
    config_dict["devices"]["rtx"]["models"] = ["rtdetr_demo"]
    cfg = load(config_dict, check_paths=False)
    assert cfg.models["yolo_demo"].output_names == ("num_detections", "boxes", "scores", "classes")
    assert cfg.models["yolo_demo"].head_output_names == ("output0",) and cfg.models["yolo_demo"].detection_outputs


# --------------------------------------------------------------------------------------------------
# Source rtdetr, against a stand-in of the official checkout

STANDIN_CORE = '''
import copy
import yaml
from src.zoo.model import TinyRTDETR, PostProcessor

class YAMLConfig:
    """Like RT-DETR's: the YAML, merged keyword overrides, models built lazily from yaml_cfg."""

    def __init__(self, cfg_path, **kwargs):
        with open(cfg_path) as fh:
            cfg = yaml.safe_load(fh)
        cfg.update(kwargs)
        self.yaml_cfg = copy.deepcopy(cfg)
        self._model = self._postprocessor = None

    @property
    def model(self):
        if self._model is None:
            if self.yaml_cfg["PResNet"]["pretrained"]:
                raise RuntimeError("would download ImageNet weights")
            self._model = TinyRTDETR(**self.yaml_cfg["TinyRTDETR"])
        return self._model

    @property
    def postprocessor(self):
        if self._postprocessor is None:
            self._postprocessor = PostProcessor(**self.yaml_cfg["PostProcessor"])
        return self._postprocessor
'''

STANDIN_MODEL = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


def mod(a, b):
    return a - a // b * b


class TinyRTDETR(nn.Module):
    def __init__(self, num_classes=3, queries=20, hidden=16):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, hidden, 3, 2, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, 2, 1))
        self.query = nn.Parameter(torch.randn(queries, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.cls = nn.Linear(hidden, num_classes)
        self.box = nn.Linear(hidden, 4)
        self.deployed = False

    def forward(self, x):
        f = self.backbone(x).flatten(2).mean(-1)  # (B, hidden)
        q = self.norm(self.query[None] + f[:, None])  # (B, Q, hidden)
        return {"pred_logits": self.cls(q), "pred_boxes": self.box(q).sigmoid()}

    def deploy(self):
        self.eval()
        self.deployed = True
        return self


class PostProcessor(nn.Module):
    def __init__(self, num_classes=3, num_top_queries=10):
        super().__init__()
        self.num_classes = num_classes
        self.num_top_queries = num_top_queries
        self.deploy_mode = False

    def forward(self, outputs, orig_target_sizes):
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        cx, cy, w, h = boxes.unbind(-1)
        bbox = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        bbox = bbox * orig_target_sizes.repeat(1, 2).unsqueeze(1)
        scores, index = torch.topk(F.sigmoid(logits).flatten(1), self.num_top_queries, dim=-1)
        labels = index % self.num_classes  # RT-DETR v1 writes %, v2 mod(); both are in the wild
        index = index // self.num_classes
        boxes = bbox.gather(dim=1, index=index.unsqueeze(-1).repeat(1, 1, 4))
        if self.deploy_mode:
            return labels, boxes, scores
        return [dict(labels=l, boxes=b, scores=s) for l, b, s in zip(labels, boxes, scores)]

    def deploy(self):
        self.eval()
        self.deploy_mode = True
        return self
'''


@pytest.fixture
def rtdetr_checkout(tmp_path):
    repo = tmp_path / "RT-DETR" / "rtdetrv2_pytorch"
    (repo / "src" / "core").mkdir(parents=True)
    (repo / "src" / "zoo").mkdir(parents=True)
    (repo / "configs").mkdir()
    (repo / "src" / "__init__.py").write_text("")
    (repo / "src" / "zoo" / "__init__.py").write_text("")
    (repo / "src" / "core" / "__init__.py").write_text(textwrap.dedent(STANDIN_CORE))
    (repo / "src" / "zoo" / "model.py").write_text(textwrap.dedent(STANDIN_MODEL))
    (repo / "configs" / "tiny.yml").write_text(
        "TinyRTDETR: {num_classes: 3, queries: 20, hidden: 16}\n"
        "PostProcessor: {num_classes: 3, num_top_queries: 10}\n"
        "PResNet: {pretrained: True}\n")
    return repo


def rtdetr_config(repo, checkpoint, **extra):
    raw = tiny_config()
    raw["models"] = {"rt": {"source": "rtdetr", "rtdetr_repo": str(repo), "rtdetr_config": str(repo / "configs/tiny.yml"),
                            "checkpoint": str(checkpoint), "layout": "rtdetr", "dataset": "demo",
                            "input_size": [64, 64], "calibration": {"images": 8}, **extra}}
    raw["devices"] = {"cpu": raw["devices"]["cpu"]}
    return load(raw, check_paths=True)


def standin_weights(repo, seed):
    import importlib
    import sys

    sys.path.insert(0, str(repo))
    try:
        for name in [n for n in sys.modules if n == "src" or n.startswith("src.")]:
            del sys.modules[name]
        model = importlib.import_module("src.zoo.model")
        torch.manual_seed(seed)
        return model.TinyRTDETR(num_classes=3, queries=20, hidden=16).state_dict()
    finally:
        sys.path.remove(str(repo))


def test_rtdetr_wrapper_exports_deploy_model_with_ema_weights(rtdetr_checkout, tmp_path):
    ema, raw = standin_weights(rtdetr_checkout, 1), standin_weights(rtdetr_checkout, 2)
    ckpt = tmp_path / "last.pth"
    torch.save({"model": raw, "ema": {"module": ema, "updates": 100}, "last_epoch": 71}, ckpt)
    cfg = rtdetr_config(rtdetr_checkout, ckpt)
    spec = cfg.models["rt"]
    out = tmp_path / "rt.onnx"
    export.export_onnx(spec, 17, out)
    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["images", "orig_target_sizes"]
    assert [o.name for o in m.graph.output] == ["labels", "boxes", "scores"]
    assert {"Mod", "TopK", "LayerNormalization"} <= {n.op_type for n in m.graph.node}
    module = export.build_module(spec)
    assert module.model.deployed and module.postprocessor.deploy_mode  # deploy() on both, as export_onnx.py
    # ema.module was loaded, not model.
    np.testing.assert_array_equal(module.model.cls.weight.detach().numpy(), ema["cls.weight"].numpy())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    sizes = torch.tensor([[640, 480], [100, 200]])
    with torch.no_grad():
        labels, boxes, scores = module(x, sizes)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy(), "orig_target_sizes": sizes.numpy()})
    np.testing.assert_allclose(got[2], scores.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], boxes.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(got[0], labels.numpy())
    # Editing the checkout's code re-exports: its digest is a tracked param.
    before = export.params(cfg, "rt")["rtdetr_code"]
    (rtdetr_checkout / "src" / "zoo" / "model.py").write_text(textwrap.dedent(STANDIN_MODEL) + "\n# edited\n")
    assert export.params(cfg, "rt")["rtdetr_code"] != before


def test_rtdetr_checkpoint_without_weights_or_repo_is_refused(rtdetr_checkout, tmp_path):
    torch.save({"optimizer": {}}, tmp_path / "bad.pth")
    spec = rtdetr_config(rtdetr_checkout, tmp_path / "bad.pth").models["rt"]
    with pytest.raises(KilnError, match=r"has neither 'ema' -> 'module' nor 'model' weights"):
        export.build_module(spec)
    raw_repo = tmp_path / "empty"
    (raw_repo / "configs").mkdir(parents=True)
    (raw_repo / "configs" / "tiny.yml").write_text("{}\n")
    with pytest.raises(KilnError, match=r"'models.rt.rtdetr_repo': '.*empty' has no src/core"):
        rtdetr_config(raw_repo, tmp_path / "bad.pth")


@pytest.mark.parametrize("name", ["torch", "ultralytics", "rtdetr"])
def test_example_configs_load(name):
    """Each example in examples/ passes the schema and Kiln's cross-checks (files need not exist)."""
    from conftest import REPO

    from kiln.config import read_yaml

    cfg = load(read_yaml(REPO / "examples" / f"{name}.yaml"), check_paths=False)
    assert {m.source for m in cfg.models.values()} == {name}
    if name == "ultralytics":
        assert all(m.trust_checkpoint for m in cfg.models.values())
        assert cfg.models["rtdetr_l"].layout == "ultralytics_rtdetr"
        from kiln import surgery

        # The TensorRT 8.5 Jetson at opset 17 asks for decompose_layernorm on the models it builds.
        assert surgery.device_passes(cfg, "rtdetr_l", 17) == {"decompose_layernorm": ["orin"]}
