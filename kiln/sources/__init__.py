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
``trust_checkpoint: true``, because unpickling can run any code the file's author put in it. When
the config loads, ``check_checkpoint`` checks each one without unpickling code (a file it passed
before, unchanged, is not checked again: its verdict is cached, so a config load imports no torch),
and a torch factory must lie in a place ``trusted_factories`` declares (:mod:`kiln.sources.factories`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

from kiln.cache import cache_dir, write_atomic
from kiln.errors import KilnError

SOURCES = ("torch", "ultralytics", "rtdetr")
LAYOUTS = {"torch": ("yolo", "rtdetr"), "ultralytics": ("yolo", "ultralytics_rtdetr"), "rtdetr": ("rtdetr",)}


def trust_hint(model_name: str) -> str:
    return (f"set 'models.{model_name}.trust_checkpoint: true' only if you trust where the file comes from "
            f"(a pickle runs code when it is loaded)")


def refused_global(message: str) -> str:
    """torch's sentence naming the global a weights-only load refused, whatever its wording ('' if none).

    torch writes "Unsupported global: GLOBAL pkg.Model was not an allowed global by default" for a class
    it does not know, and (2.13) "Trying to load unsupported GLOBAL posix.system whose module posix is
    blocked" for a blocked module; the two differ in case and order, so the global's dotted name is
    what is looked for.
    """
    for line in message.replace("\x1b[0m", "").replace("\x1b[1m", "").splitlines():
        found = _GLOBAL.search(line)
        if found:
            start = line.rfind("error: ", 0, found.start())
            start = start + len("error: ") if start >= 0 else 0
            stop = line.find(". ", found.end())
            return line[start:stop if stop >= 0 else None].strip().rstrip(".")[:200]
    return ""


_GLOBAL = re.compile(r"global:?\s+(?:GLOBAL\s+)?[A-Za-z_]\w*(?:\.\w+)+", re.IGNORECASE)
# Globals every torch.save pickle names; another one in a refused pickle is the one to report.
_PLAIN_GLOBALS = ("torch.", "collections.OrderedDict")


def pickled_globals(path: Path) -> list[str]:
    """The globals (module.name) that a zip checkpoint's data.pkl names, read by pickletools: nothing runs."""
    import pickletools

    try:
        with zipfile.ZipFile(path) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        names, memo = [], {}
        pushed: list[str | None] = []  # what the latest opcodes pushed: a string, or None for anything else
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":  # protocol 2, torch.save's: "module name"
                names.append(".".join(arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                names.append(f"{pushed[-2]}.{pushed[-1]}")
            if "UNICODE" in op.name:
                pushed.append(arg)
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(arg))
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
            elif op.name != "FRAME":
                pushed.append(None)
    except Exception:  # not a zip, no data.pkl, not a pickle: nothing to report
        return []
    return list(dict.fromkeys(n for n in names if not n.startswith(_PLAIN_GLOBALS)))


def _lead(path: Path, model_name: str, at_load: bool) -> str:
    return f"config: 'models.{model_name}.checkpoint': '{path}'" if at_load else f"checkpoint '{path}'"


def _check_file(path: Path, model_name: str, at_load: bool) -> bool:
    """Refuse what is not a complete checkpoint file; True if it is a zip archive (torch.save's format)."""
    lead = _lead(path, model_name, at_load)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt"))[:3]
        raise KilnError(
            f"{lead} is a directory, not a checkpoint file: point 'models.{model_name}.checkpoint' at the file "
            f"torch.save wrote (a .pt or .pth{'; this folder holds ' + ', '.join(inside) if inside else ''})"
        )
    if not path.is_file():
        raise KilnError(f"{lead} not found: fix 'models.{model_name}.checkpoint'")
    size = path.stat().st_size
    if size == 0:
        raise KilnError(f"{lead} is empty (0 bytes): copy or download it again")
    with path.open("rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return False
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError):
        raise KilnError(
            f"{lead} is truncated or damaged: it begins as a zip archive (torch.save's format) but its zip "
            f"directory, at the end of the file, cannot be read: copy or download it again"
        ) from None
    if any(m.header_offset + m.compress_size > size for m in members):
        raise KilnError(f"{lead} is truncated: its zip directory lists data past the end of the file ({size} bytes): "
                        f"copy or download it again")
    if not any(m.filename.endswith("data.pkl") for m in members):
        raise KilnError(f"{lead} is a zip archive but not a PyTorch checkpoint (no data.pkl in it): give the file "
                        f"torch.save wrote")
    return True


def _weights_only(path: Path, model_name: str, at_load: bool, is_zip: bool, trust: bool, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a refusal names the global torch refused. None: refused, but trusted."""
    import torch

    lead = _lead(path, model_name, at_load)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise beside the one-line answer
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        detail = refused_global(str(err)) or ", ".join(f"it names {g}" for g in pickled_globals(path)[:3])
        if not is_zip and not detail:
            raise KilnError(f"{lead} could not be read by torch.load: it is not a PyTorch checkpoint (or it is "
                            f"damaged): fix 'models.{model_name}.checkpoint'") from None
        if trust:
            return None
        raise KilnError(
            f"{lead} is not a weights-only state_dict{f' ({detail})' if detail else ''}: Kiln loads "
            f"checkpoints with torch.load(weights_only=True) because a full pickle can run code; "
            f"save model.state_dict() instead, or {trust_hint(model_name)}"
        ) from None
    except Exception as err:  # zip/EOF/format errors from a damaged or foreign file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise KilnError(f"{lead} could not be read by torch.load ({type(err).__name__}: {first}): "
                        f"is it a PyTorch checkpoint, complete and undamaged?") from None


def load_checkpoint(path: str | Path, model_name: str, trust: bool = False) -> Any:
    """``torch.load`` a checkpoint: weights only, or the full pickle when ``trust`` is set.

    Without trust a checkpoint holding objects other than tensors and plain containers is refused
    with the reason (the global torch refused) and the opt-in; with trust it is unpickled
    (weights_only=False).
    """
    import torch

    path = Path(path)
    is_zip = _check_file(path, model_name, at_load=False)
    loaded = _weights_only(path, model_name, False, is_zip, trust)
    if loaded is not None:
        return loaded
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise KilnError(f"checkpoint '{path}' could not be unpickled ({type(err).__name__}: {err}) even with "
                        f"'models.{model_name}.trust_checkpoint: true'".replace("\n", " ")) from None


# A checkpoint that is not a zip (torch's legacy format) is read whole by torch.load: at config
# time only below this size. Zip checkpoints load memory-mapped, reading only their pickle.
CHECK_LOAD_MAX_BYTES = 256 << 20


def check_checkpoint(path: str | Path, model_name: str, trust: bool) -> None:
    """Config-time check of a checkpoint, cheap and without unpickling code.

    A complete file, the zip structure torch.save writes, then, unless ``trust``, a weights-only load
    (memory-mapped: tensor data is not read). A trusted checkpoint is a full pickle, which only its
    loading can check: its zip structure is checked. A pass is cached on disk (:mod:`kiln.cache`,
    keyed by :func:`_check_key`), so the next config load of the same, unchanged file neither reads
    it nor imports torch; a refusal is not cached, so a fixed file passes at once.
    """
    path = Path(path)
    key = _check_key(path, trust)
    if key is not None and _passed_before(key):
        return
    is_zip = _check_file(path, model_name, at_load=True)
    if not (trust or (not is_zip and path.stat().st_size > CHECK_LOAD_MAX_BYTES)):
        loaded = _weights_only(path, model_name, True, is_zip, trust=False, mmap=is_zip)
        if key is not None:  # what checkpoint_classes would load the file again for
            try:
                _HEADS[json.dumps(key)] = head_classes(state_dict_of(loaded, path))
            except KilnError:
                _HEADS[json.dumps(key)] = None
    if key is not None and _check_key(path, trust) == key:  # not a verdict on a file that changed meanwhile
        _remember(key)


# Bump when check_checkpoint checks more, so that passes of the older checks are not reused.
CHECK_FORMAT = 1


def _check_key(path: Path, trust: bool) -> dict | None:
    """What a cached pass of ``path`` holds for: this file as it is now; None if it is not a plain file.

    Besides size and mtime, the inode and ctime: ``cp -p``, ``rsync -t`` or ``touch -r`` can give
    another file of the same size (two checkpoints of one model often are) the old mtime, but a
    rename gives a new inode and any write or ``touch`` a new ctime, which ``touch`` cannot set.
    """
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except (OSError, RuntimeError):
        return None
    if not stat.S_ISREG(st.st_mode):  # a directory or a missing file: refused each time, by the check
        return None
    return {"format": CHECK_FORMAT, "path": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "trust": trust}


def _verdict_file(key: dict) -> Path | None:
    """Where the pass for ``key`` is kept: one file per checkpoint path and trust, overwritten when it changes."""
    name = hashlib.sha256(json.dumps([key["format"], key["path"], key["trust"]]).encode()).hexdigest()[:32]
    try:
        return cache_dir() / "checkpoint-checks" / f"{name}.json"
    except RuntimeError:  # no home folder to find ~/.cache in: no caching
        return None


def _passed_before(key: dict) -> bool:
    """Whether check_checkpoint passed the file ``key`` describes (an unreadable cache: no)."""
    where = _verdict_file(key)
    try:
        return where is not None and json.loads(where.read_text()) == key
    except (OSError, ValueError):
        return False


def _remember(key: dict) -> None:
    where = _verdict_file(key)
    if where is not None:
        write_atomic(where, json.dumps(key))


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


def check_model(name: str, m: dict, base: Path, check_paths: bool, packages: tuple[str, ...] = ("kiln.demo.models",),
                folders: tuple[str, ...] = ()) -> None:
    """Config-time checks of one model's source keys (the schema has filled defaults).

    Nothing the config names is imported: a torch factory must lie in the trusted ``packages`` or
    ``folders`` (kiln.sources.factories), and checkpoints are checked without unpickling code.
    """
    source = m["source"]
    where = f"config: 'models.{name}"

    def exists(key: str, is_dir: bool = False) -> None:
        value = m[key]
        p = Path(value) if Path(value).is_absolute() else base / value
        if check_paths and not (p.is_dir() if is_dir else p.is_file()):
            raise KilnError(f"{where}.{key}': {'folder' if is_dir else 'file'} '{value}' not found: fix the path "
                            f"(relative to {base.resolve()})")

    def checkpoint(content: bool = True) -> None:
        """The checkpoint is a file; with ``content``, also what check_checkpoint checks."""
        p = base / m["checkpoint"]  # an absolute checkpoint stays itself
        if not check_paths:
            return
        if not p.exists():
            exists("checkpoint")
        if content or p.is_dir():  # a directory is refused first, saying what is expected
            check_checkpoint(p, name, m["trust_checkpoint"])

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
        from kiln.sources import factories

        factories.resolve(name, m["factory"], packages, folders)
        checkpoint()
    elif source == "ultralytics":
        forbid("factory", "rtdetr_repo", "rtdetr_config")
        if bool(m.get("checkpoint")) == bool(m.get("ultralytics_yaml")):
            raise KilnError(f"{where}': source ultralytics needs exactly one of 'checkpoint' (a .pt file) and "
                            f"'ultralytics_yaml' (a model YAML, random weights: for tests)")
        if m.get("checkpoint"):
            checkpoint(content=False)
            if not m["trust_checkpoint"]:
                raise KilnError(
                    f"{where}.checkpoint': '{m['checkpoint']}' is an Ultralytics checkpoint, which pickles the whole "
                    f"model object, so loading it can run code; Kiln loads only weights-only files by default: "
                    f"{trust_hint(name)}"
                )
            checkpoint()
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
        checkpoint()
        if check_paths:
            repo = Path(m["rtdetr_repo"]) if Path(m["rtdetr_repo"]).is_absolute() else base / m["rtdetr_repo"]
            if not (repo / "src" / "core").is_dir():
                raise KilnError(f"{where}.rtdetr_repo': '{m['rtdetr_repo']}' has no src/core: point it at the folder "
                                f"holding RT-DETR's src/ and tools/ (e.g. RT-DETR/rtdetrv2_pytorch)")


# Each source is one adapter module with build_module(spec) and params(spec), imported by name only
# when a model uses it: a stage's code fingerprint covers its model's adapter and no other.
ADAPTERS = {"torch": "kiln.sources.torch", "ultralytics": "kiln.sources.ultralytics", "rtdetr": "kiln.sources.rtdetr"}


def adapter(source: str):
    """The adapter module of ``source`` (kiln.sources.torch, ...)."""
    import importlib

    return importlib.import_module(ADAPTERS[source])


def build_module(spec):
    """The model of ``spec`` in eval mode, ready to trace: forward(inputs) -> the layout's outputs."""
    return adapter(spec.source).build_module(spec)


def params(spec) -> dict:
    """What of the source, beside the config keys, changes the export (code and versions)."""
    return adapter(spec.source).params(spec)


def model_params(m) -> dict:
    """Everything in a model's config and source that changes the built nn.Module (export, baseline)."""
    out = {
        "source": m.source,
        "factory": m.factory,
        # The model's own code: editing the factory's module (or the RT-DETR checkout) re-exports.
        **params(m),
        "factory_args": m.factory_args,
        "layout": m.layout,
        "input_size": list(m.input_size),
        "dynamic_batch": m.dynamic_batch,
        "dynamic_hw": m.dynamic_hw,
    }
    if m.source != "torch" or m.trust_checkpoint:
        out.update(trust_checkpoint=m.trust_checkpoint, max_det=m.decode["max_det"])
    return out


# --------------------------------------------------------------------------- class counts

# The final classification layers of the detection heads Kiln knows, by state_dict key: the demo YOLO's
# head.cls.<level>.2, Ultralytics Detect's cv3.<level>.2, and RT-DETR's (official, Ultralytics', the demo's)
# enc_score_head / dec_score_head.<layer>. Their weight's first dimension is the class count.
_HEAD_KEYS = re.compile(r"(?:^|\.)(?:cls\.\d+\.\d+|cv3\.\d+\.2|enc_score_head|dec_score_head\.\d+)\.weight$")


# Class counts check_checkpoint found while it loaded a file anyway, by _check_key: no second load.
_HEADS: dict[str, tuple[int, str] | None] = {}


def head_classes(state: dict) -> tuple[int, str] | None:
    """(class count, the key it was read from) of a state_dict's detection head; None if none is known or they differ."""
    found = {k: int(v.shape[0]) for k, v in state.items() if _HEAD_KEYS.search(k) and len(getattr(v, "shape", ())) >= 2}
    counts = set(found.values())
    if len(counts) != 1:
        return None
    return counts.pop(), sorted(found)[-1]


def _pickled_nc(path: Path) -> int | None:
    """The ``nc`` a pickled Ultralytics checkpoint's model YAML (and its head) records, read by pickletools:
    nothing is unpickled. None where no single value is found."""
    import pickletools

    try:
        with zipfile.ZipFile(path) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        values, last = set(), None
        for op, arg, _ in pickletools.genops(data):
            if last == "nc" and op.name in ("BININT1", "BININT2", "BININT", "INT", "LONG1"):
                values.add(int(arg))
            last = arg if "UNICODE" in op.name else (last if op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE") else None)
    except Exception:  # not a zip pickle: unknown
        return None
    return values.pop() if len(values) == 1 else None


def checkpoint_classes(path: str | Path, model_name: str, trust: bool) -> tuple[int, str] | None:
    """(class count, what of the file it was read from) of a checkpoint's detection head, without unpickling
    code; cached.

    A weights-only checkpoint: the head's final layer shape in its state_dict (memory-mapped: no tensor
    data is read). A trusted full pickle (Ultralytics): the ``nc`` its pickle records, read by pickletools.
    Cached like :func:`check_checkpoint`'s pass, so an unchanged file is read once.
    """
    path = Path(path)
    key = _check_key(path, trust)
    where = _classes_file(key) if key is not None else None
    try:
        cached = json.loads(where.read_text()) if where is not None else None
        if cached and cached.get("key") == key:
            return tuple(cached["found"]) if cached["found"] else None
    except (OSError, ValueError):
        pass
    if key is not None and json.dumps(key) in _HEADS:  # read by check_checkpoint in this process
        found = _HEADS[json.dumps(key)]
    elif trust:
        nc = _pickled_nc(path)
        found = (nc, "model yaml nc") if nc is not None else None
    else:
        is_zip = _check_file(path, model_name, at_load=True)
        if not is_zip and path.stat().st_size > CHECK_LOAD_MAX_BYTES:
            return None
        try:
            state = state_dict_of(_weights_only(path, model_name, True, is_zip, trust=False, mmap=is_zip), path)
        except KilnError:
            return None  # the export says what is wrong with it
        head = head_classes(state)
        found = head
    if where is not None and _check_key(path, trust) == key:
        write_atomic(where, json.dumps({"key": key, "found": list(found) if found else None}))
    return found


def _classes_file(key: dict) -> Path | None:
    name = hashlib.sha256(json.dumps([key["format"], key["path"], key["trust"]]).encode()).hexdigest()[:32]
    try:
        return cache_dir() / "class-counts" / f"{name}.json"
    except RuntimeError:
        return None


def num_classes(spec, base: str | Path = ".") -> tuple[int, str] | None:
    """(class count, where it was read) of a model before any job, from its source adapter; None if unknown."""
    return adapter(spec.source).num_classes(spec, Path(base))


def checkpoint_head(spec, base: Path) -> tuple[int, str] | None:
    """:func:`checkpoint_classes` of a model's checkpoint, saying where as the config names the file."""
    found = checkpoint_classes(Path(base) / spec.checkpoint, spec.name, spec.trust_checkpoint)
    return (found[0], f"checkpoint '{spec.checkpoint}' {found[1]}") if found else None
