"""Run while the trainer image is built (`python -m tweetbot_trainer.image_check`): the build fails when torch's
CUDA, the base image's CUDA and DeepSpeed's prebuilt ops do not belong together.

torch's wheels bring their own CUDA runtime, so a node needs a driver for torch's CUDA major (CUDA 13: driver
580 or newer); DeepSpeed's ops are compiled with the base image's nvcc and load only under the same major.
"""

from __future__ import annotations

import os
import sys


def cuda_major(version: str | None) -> str:
    return (version or "").split(".")[0]


def problems(torch_cuda: str | None, base_cuda: str, ds_accelerator: str, built_for: str,
             wanted_ops: dict[str, bool], installed_ops: dict[str, bool]) -> list[str]:
    """What is wrong with the image; `wanted_ops`: DeepSpeed ops the build asked to prebuild (DS_BUILD_<OP>=1)."""
    found = []
    if not torch_cuda:
        found.append("torch was built without CUDA: the lock must pin a CUDA build of torch")
    elif cuda_major(torch_cuda) != cuda_major(base_cuda):
        found.append(f"torch uses CUDA {torch_cuda} but the base image is CUDA {base_cuda}: pin CUDA_VERSION to "
                     f"torch's major ({cuda_major(torch_cuda)}.x) or a torch built for CUDA {cuda_major(base_cuda)}")
    if built_for != ds_accelerator:
        found.append(f"DeepSpeed's ops were built for {built_for!r}, not DS_ACCELERATOR={ds_accelerator!r}")
    for op, wanted in wanted_ops.items():
        if wanted and not installed_ops.get(op):
            found.append(f"DS_BUILD_{op.upper()}=1 but DeepSpeed has no prebuilt {op} op")
    return found


def main() -> int:
    import torch
    from deepspeed.git_version_info import accelerator_name, installed_ops

    wanted = {name.removeprefix("DS_BUILD_").lower(): value == "1"
              for name, value in os.environ.items() if name.startswith("DS_BUILD_") and name != "DS_BUILD_OPS"}
    found = problems(torch.version.cuda, os.environ.get("CUDA_VERSION", ""), os.environ.get("DS_ACCELERATOR", ""),
                     accelerator_name, wanted, installed_ops)
    for problem in found:
        print(f"image check: {problem}", file=sys.stderr)
    if not found:
        prebuilt = ", ".join(op for op, built in installed_ops.items() if built) or "none"
        print(f"image check: torch {torch.__version__} (CUDA {torch.version.cuda}) on a CUDA {os.environ.get('CUDA_VERSION')} "
              f"base; DeepSpeed ops for {accelerator_name}: {prebuilt}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
