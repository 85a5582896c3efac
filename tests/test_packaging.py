"""The install layout: kernels/ is grpo_fast.kernels and never shadows Hugging Face's ``kernels`` package."""

import subprocess
import sys
from pathlib import Path

import grpo_fast
import grpo_fast.kernels

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_kernels_installed_under_grpo_fast():
    assert Path(grpo_fast.kernels.__file__).parent.name == "kernels"
    assert "grpo_fast.kernels" in sys.modules
    assert "kernels" not in sys.modules or "grpo_fast" not in str(getattr(sys.modules["kernels"], "__file__", ""))


def test_repo_root_not_on_sys_path():
    roots = {str(Path(p).resolve()) for p in sys.path if p}
    assert str(REPO) not in roots, "pytest put the repo root on sys.path: kernels/ would shadow HF kernels"


def test_hf_kernels_availability_unchanged_from_repo_root(tmp_path):
    from transformers.utils import is_kernels_available

    code = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    elsewhere = _run(code, tmp_path)
    assert str(is_kernels_available()) == elsewhere
    # the way make test runs Python from the checkout (PYTHONSAFEPATH) keeps the answer too
    safe = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert safe == elsewhere


def test_import_without_triton(tmp_path):
    """``import grpo_fast`` and the CPU ops work where triton is not installed (e.g. macOS)."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, grpo_fast\n"
        "from grpo_fast.kernels import linear_logprobs, grpo_loss, group_advantages\n"
        "h = torch.randn(3, 8); w = torch.randn(11, 8); t = torch.tensor([1, 2, 3])\n"
        "print(linear_logprobs(h, w, t).shape)\n"
    )
    assert _run(code, tmp_path) == "torch.Size([3])"
