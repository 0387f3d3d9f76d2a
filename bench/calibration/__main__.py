"""``python -m bench.calibration``: run the calibration corpus (see the package docstring)."""
from . import torchvision_compat  # noqa: F401  (first: before anything imports torchvision)
from .runner import main

if __name__ == "__main__":
    raise SystemExit(main())
