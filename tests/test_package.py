"""The top-level API, imported the way TRL users write `from trl import DPOConfig, DPOTrainer`."""

import ast
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import fifa_hf


def test_the_public_api_imports_from_the_package():
    from fifa_hf import DiffusionDPOConfig, DiffusionDPOTrainer, FiFAConfig, FiFAFilter, __version__

    assert __version__ == version("fifa-hf")
    assert (DiffusionDPOConfig.__name__, DiffusionDPOTrainer.__name__) == ("DiffusionDPOConfig", "DiffusionDPOTrainer")
    assert (FiFAConfig.__name__, FiFAFilter.__name__) == ("FiFAConfig", "FiFAFilter")
    for name in fifa_hf.__all__:  # every advertised name resolves to the object of that name
        assert getattr(fifa_hf, name).__name__ == name
    assert set(fifa_hf.__all__) <= set(dir(fifa_hf))
    with pytest.raises(AttributeError, match="has no attribute 'DPOTrainer'"):
        fifa_hf.DPOTrainer  # noqa: B018


def test_importing_the_package_loads_no_model_stack():
    heavy = ("torch", "diffusers", "transformers", "datasets", "trl", "peft")
    code = f"import sys, fifa_hf; print(fifa_hf.__version__, [m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [version("fifa-hf"), "[]"]


# Each part of the package may import its own modules and those of lower layers only: the filter, the trainer
# and evaluation stand side by side on the shared layers, and the miniature world and the CLI use them all.
LAYERS = [
    {"errors", "progress", "host_memory", "images", "testing"},
    {"storage"},
    {"redact", "resolve"},
    {"data", "pipelines", "selection", "scoring"},
    {"cards"},
    {"hub"},
    {"filter", "trainer", "evaluation"},
    {"world"},
    {"__init__"},
    {"cli"},
]


def test_lower_layers_never_import_higher_ones_or_their_neighbours():
    layer = {part: index for index, parts in enumerate(LAYERS) for part in parts}
    package = Path(fifa_hf.__file__).parent

    def part(module: str) -> str:
        return module.split(".")[1] if "." in module else "__init__"

    offences = []
    for path in sorted(package.rglob("*.py")):
        importer = part(".".join(("fifa_hf", *path.relative_to(package).with_suffix("").parts)))
        assert importer in layer, f"{path.relative_to(package)} belongs to no layer: add it to LAYERS"
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for imported in (part(name) for name in names if name.split(".")[0] == "fifa_hf"):
                if imported != importer and layer[imported] >= layer[importer]:
                    offences.append(f"{path.relative_to(package)} imports fifa_hf.{imported}")
    assert offences == []
