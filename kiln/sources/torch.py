"""Source ``torch``: a ``module:function`` factory builds the nn.Module, a checkpoint fills its weights."""

from __future__ import annotations

import importlib

from kiln.errors import KilnError
from kiln.sources import load_checkpoint, state_dict_of


def factory(spec):
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
        raise KilnError(f"config: 'models.{spec.name}.factory' returned {type(module).__name__}, not a torch nn.Module")
    state = load_state_dict(spec.checkpoint, spec.name, spec.trust_checkpoint)
    load_strict(module, state, spec, f"'models.{spec.name}.factory' with its factory_args")
    return module.eval()
