"""Test-only: our DeepSpeedStrategy (Lightning's, atomic checkpoints) on CPU processes (gloo), its CUDA-only steps lifted.

Lightning 2.6.6 refuses any accelerator but CUDA in ``DeepSpeedStrategy.setup_environment`` and device indices
that are not GPU ordinals in ``setup_distributed``, and hands DeepSpeed the root device's index (None on a CPU);
DeepSpeed itself runs on the CPU (its CPU accelerator, ``init_distributed("gloo")``). Everything else is the real Lightning and DeepSpeed code the presets run on GPUs.
"""

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from sft_lightning.zero import DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own adds only the CUDA check

    def setup_distributed(self) -> None:  # as DeepSpeedStrategy's, less the GPU index check
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # an index for DeepSpeed's device_rank; tensors ignore it
