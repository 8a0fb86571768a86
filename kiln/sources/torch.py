"""Source ``torch``: a ``module:function`` factory builds the nn.Module, a checkpoint fills its weights."""

from __future__ import annotations

from kiln.errors import KilnError
from kiln.sources import factories, load_checkpoint, state_dict_of


def factory(spec):
    """The factory's callable, imported from the trusted place it was found in (kiln.sources.factories)."""
    trusted = (spec.trusted_packages, spec.trusted_folders)
    return factories.import_factory(spec.name, factories.resolve(spec.name, spec.factory, *trusted), *trusted)


def load_state_dict(path, model_name: str, trust: bool = False) -> dict:
    """A state_dict from a checkpoint: weights-only unless ``trust`` (then a pickled module works too)."""
    return state_dict_of(load_checkpoint(path, model_name, trust), path)


def load_strict(module, state: dict, spec, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line account of what does not fit."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or resized:
        raise KilnError(
            f"checkpoint '{spec.checkpoint}' does not fit {what} "
            f"({len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
            f"{len(resized)} of another shape {resized[:2]}): check factory_args (e.g. num_classes) and the checkpoint"
        )
    module.load_state_dict(state, strict=True)


def build_module(spec):
    """Instantiate the model from its factory and load the checkpoint strictly."""
    import torch

    module = factory(spec)(**spec.factory_args)
    if not isinstance(module, torch.nn.Module):
        raise KilnError(f"config: 'models.{spec.name}.factory': '{spec.factory}' returned {type(module).__name__}, "
                        f"not a torch.nn.Module: name a function that builds and returns the model")
    state = load_state_dict(spec.checkpoint, spec.name, spec.trust_checkpoint)
    load_strict(module, state, spec, f"'models.{spec.name}.factory' with its factory_args")
    return module.eval()


def params(spec) -> dict:
    """The factory module's source file, found by path and not imported: a dry run never runs it."""
    from kiln.fingerprint import file_fingerprint

    found = factories.locate(spec.factory, spec.trusted_packages, spec.trusted_folders) if spec.factory else None
    return {"factory_code": file_fingerprint(found.file) if found else None}


def num_classes(spec, base) -> tuple[int, str] | None:
    """The head's class count in the checkpoint's state_dict, else factory_args num_classes / nc; None if unknown."""
    from pathlib import Path

    from kiln.sources import checkpoint_head

    found = checkpoint_head(spec, Path(base))
    if found:
        return found
    for key in ("num_classes", "nc"):
        if isinstance(spec.factory_args.get(key), int):
            return spec.factory_args[key], f"'models.{spec.name}.factory_args.{key}'"
    return None
