"""What TRL's ``tests/testing_utils.py`` gives the GRPO test file, for the offline harness: the temp-dir base class
and the ``require_*`` markers, with the same meaning (skip when the dependency or an accelerator is missing)."""

from __future__ import annotations

import pytest
import torch
from transformers import is_bitsandbytes_available
from transformers.testing_utils import torch_device
from transformers.utils import is_kernels_available, is_peft_available, is_vision_available
from trl.import_utils import is_jmespath_available, is_liger_kernel_available, is_vllm_available

require_bitsandbytes = pytest.mark.skipif(not is_bitsandbytes_available(), reason="test requires bitsandbytes")
require_jmespath = pytest.mark.skipif(not is_jmespath_available(), reason="test requires jmespath")
require_kernels = pytest.mark.skipif(not is_kernels_available(), reason="test requires kernels")
require_liger_kernel = pytest.mark.skipif(not is_liger_kernel_available(), reason="test requires liger-kernel")
require_peft = pytest.mark.skipif(not is_peft_available(), reason="test requires peft")
require_torch_accelerator = pytest.mark.skipif(
    torch_device is None or torch_device == "cpu", reason="test requires accelerator"
)
require_vision = pytest.mark.skipif(not is_vision_available(), reason="test requires vision")
require_vllm = pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")


def is_ampere_or_newer(device_index: int = 0) -> bool:
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


class TrlTestCase:
    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)
