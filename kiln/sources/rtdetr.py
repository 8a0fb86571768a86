"""Source ``rtdetr``: the official RT-DETR / RT-DETRv2 code (github.com/lyuwenyu/RT-DETR), in the user's checkout.

Kiln does what the repository's ``tools/export_onnx.py`` does (``rtdetr_pytorch`` and
``rtdetrv2_pytorch`` alike): ``YAMLConfig(config)`` from the checkout's ``src.core``, the checkpoint's
``ema.module`` weights (else ``model``) loaded into ``cfg.model``, then one module holding
``cfg.model.deploy()`` and ``cfg.postprocessor.deploy()`` whose ``forward(images, orig_target_sizes)``
returns ``(labels, boxes, scores)``: boxes xyxy in the pixels of ``orig_target_sizes`` (w, h), the
top ``num_top_queries`` per image. That is Kiln's ``rtdetr`` layout.

Differences from the repository's script, on purpose: the checkpoint loads weights-only unless
``trust_checkpoint`` (the script unpickles it fully); backbones marked ``pretrained`` in the YAML are
not downloaded (the checkpoint holds their weights; D-FINE's export does the same); the opset is
the device's, not a fixed 16.

Not run against the real repository here (no network on the host where it was written): the
wrapper is tested with a stand-in checkout of the same shape (``src/core`` with ``YAMLConfig``,
model and postprocessor with ``deploy()``), see tests/test_sources.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

from kiln.errors import KilnError

# Backbone sections whose `pretrained: True` would download ImageNet weights when the model is built.
PRETRAINED_BACKBONES = ("PResNet", "HGNetv2", "TimmModel", "CSPResNet")


def _repo(spec) -> Path:
    return Path(spec.rtdetr_repo).resolve()


def params(spec) -> dict:
    """The checkout's code and configs, by digest: editing them re-exports."""
    repo = _repo(spec)
    h = hashlib.sha256()
    for pattern in ("src/**/*.py", "configs/**/*.yml", "configs/**/*.yaml"):
        for f in sorted(repo.glob(pattern)):
            h.update(str(f.relative_to(repo)).encode())
            h.update(f.read_bytes())
    cfg = Path(spec.rtdetr_config)
    return {"rtdetr_code": h.hexdigest()[:16],
            "rtdetr_config": hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else None}


@contextlib.contextmanager
def _checkout_on_path(repo: Path):
    """Import the checkout's top-level ``src`` package, not another one already imported or on sys.path."""
    for name in [n for n in sys.modules if n == "src" or n.startswith("src.")]:
        mod_file = getattr(sys.modules[name], "__file__", None) or ""
        if not Path(mod_file).resolve().is_relative_to(repo):
            del sys.modules[name]
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(repo))


def deploy_model(model, postprocessor):
    """The export module of RT-DETR's tools/export_onnx.py: model and postprocessor in deploy mode."""
    import torch

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.deploy()
            self.postprocessor = postprocessor.deploy()

        def forward(self, images, orig_target_sizes):
            outputs = self.model(images)
            return self.postprocessor(outputs, orig_target_sizes)

    return Model().eval()


def build_module(spec):
    from kiln.sources import load_checkpoint
    from kiln.sources.torch import load_strict

    repo = _repo(spec)
    if not (repo / "src" / "core").is_dir():
        raise KilnError(f"'models.{spec.name}.rtdetr_repo': '{spec.rtdetr_repo}' has no src/core: point it at "
                        f"RT-DETR's rtdetr_pytorch or rtdetrv2_pytorch folder")
    with _checkout_on_path(repo):
        try:
            from src.core import YAMLConfig
        except Exception as err:
            raise KilnError(f"cannot import YAMLConfig from '{repo}/src/core' ({type(err).__name__}: {err}): install "
                            f"the checkout's requirements (requirements.txt) in Kiln's environment") from None
        cfg = YAMLConfig(str(Path(spec.rtdetr_config).resolve()))
        for name in PRETRAINED_BACKBONES:
            section = cfg.yaml_cfg.get(name)
            if isinstance(section, dict) and section.get("pretrained"):
                section["pretrained"] = False  # weights come from the checkpoint; no download
        ckpt = load_checkpoint(spec.checkpoint, spec.name, spec.trust_checkpoint)
        if isinstance(ckpt, dict) and isinstance(ckpt.get("ema"), dict) and "module" in ckpt["ema"]:
            state = ckpt["ema"]["module"]
        elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
            state = ckpt["model"]
        else:
            raise KilnError(f"checkpoint '{spec.checkpoint}' has neither 'ema' -> 'module' nor 'model' weights: "
                            f"give the checkpoint RT-DETR's train.py saved")
        model, post = cfg.model, cfg.postprocessor
        load_strict(model, state, spec, f"the model of '{spec.rtdetr_config}'")
        return deploy_model(model, post)


def num_classes(spec, base) -> tuple[int, str] | None:
    """The class count of the checkpoint's score heads (enc_score_head, dec_score_head)."""

    from kiln.sources import checkpoint_head

    return checkpoint_head(spec, Path(base))
