"""The top-level API, imported the way TRL users write `from trl import DPOConfig, DPOTrainer`."""

import subprocess
import sys
from importlib.metadata import version

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
