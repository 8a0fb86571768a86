"""Where a torch ``factory: module:function`` may come from, found without importing anything.

A factory is code that the config names, so Kiln imports it only from places the user declared
trusted (``trusted_factories``): the modules of the packages in ``trusted_factories.packages`` and
the modules under the folders in ``trusted_factories.folders``. Anything else (``os:system``, say)
is refused when the config loads, before any job.

Checking and planning (``kiln check``, ``snakemake -n``, the factory's fingerprint) find the module's
source file by path alone. A package is located with ``importlib.util.find_spec`` on its top-level
name only, which runs the import system's finders but executes no module (a dotted name would import
its parents); the rest of the dotted name is walked as folders and files, in the order the import
system uses. Only the jobs that build the model (export, baseline) import the module, and they check
that the import gave that very file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError


@dataclass(frozen=True)
class FactorySource:
    """A factory located in a trusted place: its module's source file, and where that is imported from."""

    module: str  # dotted module name, e.g. kiln.demo.models
    function: str
    file: Path  # the module's source file, resolved
    folder: Path | None  # trusted folder to put on sys.path for the import; None: an installed package


def _step(locations: list[Path], part: str) -> tuple[Path | None, list[Path] | None]:
    """One level of a dotted name under package folders: (source file, folders of its submodules).

    As the import system's path finder: a regular package or a module in the first location that has
    either, else a namespace package of every location holding a folder of that name.
    """
    portions = []
    for loc in locations:
        folder = loc / part
        if (folder / "__init__.py").is_file():
            return folder / "__init__.py", [folder]
        if (loc / f"{part}.py").is_file():
            return loc / f"{part}.py", None
        if folder.is_dir():
            portions.append(folder)
    return None, portions or None


def _source_under(locations: list[Path], parts: list[str]) -> Path | None:
    """The source file of the module ``parts`` below the package folders ``locations``; None if none."""
    found = None
    for part in parts:
        if not locations:  # the parent is a plain module (or nothing): no submodules
            return None
        found, locations = _step(locations, part)
    return found.resolve() if found else None


def package_locations(package: str) -> list[Path] | None:
    """Folders of an installed package (its ``__path__``), or [its file] for a plain module; None if absent.

    Only the top-level name goes to ``find_spec`` (it imports nothing for a top-level name); the rest
    of ``package`` is walked on disk.
    """
    top, *rest = package.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations is None:
        return [Path(spec.origin)] if not rest and spec.origin and Path(spec.origin).suffix == ".py" else None
    locations = [Path(p) for p in spec.submodule_search_locations]
    for i, part in enumerate(rest):
        found, locations = _step(locations, part)
        if locations is None:  # a plain module: the end of the name, or nothing
            return [found] if found and i == len(rest) - 1 else None
    return locations


def _in_package(module: str, package: str, locations: list[Path]) -> Path | None:
    if module == package:
        if len(locations) == 1 and locations[0].suffix == ".py":  # a plain module
            return locations[0].resolve()
        init = [p / "__init__.py" for p in locations if (p / "__init__.py").is_file()]
        return init[0].resolve() if init else None
    return _source_under(locations, module[len(package) + 1:].split("."))


def locate(factory: str, packages: tuple[str, ...], folders: tuple[str, ...]) -> FactorySource | None:
    """The factory's module in the trusted packages, then the trusted folders; None if in none of them."""
    module, _, function = factory.partition(":")
    for package in packages:
        if module == package or module.startswith(package + "."):
            locations = package_locations(package)
            found = _in_package(module, package, locations) if locations else None
            if found:
                return FactorySource(module, function, found, None)
    for folder in folders:
        found = _source_under([Path(folder)], module.split("."))
        if found:
            return FactorySource(module, function, found, Path(folder))
    return None


def places(packages: tuple[str, ...], folders: tuple[str, ...]) -> str:
    return (f"the packages in 'trusted_factories.packages' ({', '.join(packages) or 'none'}) and the modules "
            f"under the folders in 'trusted_factories.folders' ({', '.join(folders) or 'none'})")


def resolve(model: str, factory: str, packages: tuple[str, ...], folders: tuple[str, ...]) -> FactorySource:
    """``locate``, or one line naming the key, the trusted places and how to add one."""
    found = locate(factory, packages, folders)
    if found:
        return found
    module = factory.partition(":")[0]
    where = f"config: 'models.{model}.factory'"
    for package in packages:
        if module == package or module.startswith(package + "."):
            locations = package_locations(package)
            if not locations:
                raise KilnError(f"{where}: '{factory}' is in trusted package '{package}', which is not installed "
                                f"in this environment: install it, or fix 'trusted_factories.packages'")
            if not folders:
                raise KilnError(f"{where}: no module '{module}' in trusted package '{package}' "
                                f"({', '.join(map(str, locations))}): fix the module path")
    raise KilnError(
        f"{where}: '{factory}' is not in a trusted place: Kiln imports factories only from {places(packages, folders)}; "
        f"put its module there, or add its package or folder to 'trusted_factories' if you trust all the code in it"
    )


def import_factory(model: str, source: FactorySource, packages: tuple[str, ...], folders: tuple[str, ...]):
    """Import the located module, check it is that file and the function is defined in a trusted place."""
    where = f"config: 'models.{model}.factory'"
    if source.folder is not None and str(source.folder) not in sys.path:
        sys.path.insert(0, str(source.folder))
    try:
        module = importlib.import_module(source.module)
    except ImportError as err:
        raise KilnError(f"{where}: cannot import '{source.module}' from {source.file} ({err}): install what it "
                        f"imports, or fix the module path") from None
    got = Path(getattr(module, "__file__", None) or "").resolve()
    if got != source.file:
        raise KilnError(f"{where}: '{source.module}' was imported from {got}, not from the trusted {source.file} "
                        f"(a module of that name came first): rename the factory's module")
    func = getattr(module, source.function, None)
    if not callable(func):
        raise KilnError(f"{where}: '{source.module}' has no function '{source.function}'")
    defined_in = getattr(func, "__module__", None)
    if defined_in != source.module and not (defined_in and locate(f"{defined_in}:f", packages, folders)):
        # e.g. `from os import system` in a trusted module: the callable itself comes from elsewhere.
        raise KilnError(f"{where}: '{source.module}:{source.function}' is defined in '{defined_in}', which is not "
                        f"in a trusted place ({places(packages, folders)}): name a factory defined there")
    return func
