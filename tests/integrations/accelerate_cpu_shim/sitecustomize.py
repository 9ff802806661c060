"""Test-only shim (put on PYTHONPATH of `accelerate launch`): lets accelerate run FSDP2 and DeepSpeed on
CPU processes, so the HF Trainer's own FSDP2 / ZeRO preparation runs in `make test`.

accelerate keeps FSDP and DeepSpeed off for CPU processes (MULTI_CPU is not among the distributed types
it upgrades). Here a launched process reports a "multi-GPU" type with the gloo backend and the CPU as
its device (ACCELERATE_TORCH_DEVICE); the engines themselves run unchanged on CPU tensors. FSDP1 is
not covered: accelerate's FSDP1 path asks for an accelerator device. DeepSpeed's CPU accelerator
would JIT-compile a shared-memory all-reduce op at init (minutes); gloo does without it.
"""

import importlib.util
import os

import accelerate.state
from accelerate.utils import DistributedType

_prepare_backend = accelerate.state.PartialState._prepare_backend


def _cpu_as_accelerator(self, cpu=False, sagemaker_dp=False, backend=None):
    if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not cpu:
        return "gloo", DistributedType.MULTI_GPU
    return _prepare_backend(self, cpu, sagemaker_dp, backend)


accelerate.state.PartialState._prepare_backend = _cpu_as_accelerator
os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
if importlib.util.find_spec("deepspeed") is not None:
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
