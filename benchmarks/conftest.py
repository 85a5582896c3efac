"""pytest-benchmark cases of benchmarks/ import the benchmark scripts' inputs and variants: put this folder on
sys.path, as running a script does (the checkout's root stays off it, so kernels/ cannot shadow)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
