"""The run layout is the one place the data module and the model learn the ranks, the sizes and the loss divisor."""

import re
from types import SimpleNamespace

import lightning as L
import pytest

from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.errors import ConfigError
from sft_lightning.layout import ConnectRunLayout, RunLayout, framework_divisor
from sft_lightning.module import SFTLitModule
from sft_lightning.sharding import FSDP2Strategy
from tests.conftest import ROOT, TINY_QWEN

PACKAGE = ROOT / "sft_lightning"


@pytest.mark.parametrize("module", ["datamodule.py", "module.py"])
def test_the_data_and_the_model_read_no_rank_size_or_divisor_of_their_own(module):
    source = (PACKAGE / module).read_text()
    assert not re.findall(r"\.(world_size|global_rank|accumulate_grad_batches|num_nodes)\b", source)
    assert not re.findall(r"strategy\.sequence_parallel_size", source)
    assert "framework_divisor" not in source and "import RunLayout" in source


def test_the_framework_divisor_is_computed_in_one_place():
    users = [p.name for p in PACKAGE.glob("*.py") if "framework_divisor(" in p.read_text()]
    assert users == ["layout.py"]


def trainer_stand_in(world_size: int, rank: int, accumulate: int, deepspeed: bool):
    strategy = SimpleNamespace(config={"zero_optimization": {"stage": 2}}) if deepspeed else SimpleNamespace()
    return SimpleNamespace(world_size=world_size, global_rank=rank, accumulate_grad_batches=accumulate, strategy=strategy,
                           local_rank=rank % 2, num_devices=2)


def test_the_layout_reads_the_strategy_once(monkeypatch):
    import sft_lightning.layout as layout

    monkeypatch.setattr(layout, "deepspeed_config", lambda strategy: getattr(strategy, "config", None))
    ddp = RunLayout.of(trainer_stand_in(4, 3, 2, deepspeed=False))
    assert ddp == RunLayout(processes=4, rank=3, data_parallel_size=4, data_parallel_rank=3, accumulation=2,
                            loss_divisor=8, local_rank=1, processes_per_node=2)
    assert RunLayout.of(trainer_stand_in(4, 3, 2, deepspeed=True)).loss_divisor == 16  # engine.backward divides again
    assert framework_divisor(True, 2, 4) == 16 and not RunLayout().distributed
    # Sequence parallel 2 over 4 processes: groups {0, 1} and {2, 3} take the micro-batches of data-parallel ranks 0
    # and 1; the gradients are still averaged over all 4 processes.
    sequence = trainer_stand_in(4, 3, 2, deepspeed=False)
    sequence.strategy = FSDP2Strategy(sequence_parallel_size=2)
    assert RunLayout.of(sequence) == RunLayout(processes=4, rank=3, data_parallel_size=2, data_parallel_rank=1,
                                               sequence_parallel_size=2, sequence_parallel_rank=1, accumulation=2,
                                               loss_divisor=8, local_rank=1, processes_per_node=2)


def test_sequence_parallelism_without_packing_is_refused_in_one_line():
    data = ChatMLDataModule(train_path=str(ROOT / "data" / "chatml_data.json"), tokenizer_path=TINY_QWEN, packing=False)
    with pytest.raises(ConfigError, match="^sequence_parallel_size 2 splits packed rows along their length: set data.packing true$"):
        data.connect_layout(RunLayout(processes=2, sequence_parallel_size=2, rank=1, sequence_parallel_rank=1))
    with pytest.raises(ConfigError, match="sequence_parallel_size must be 1 or more, not 0"):
        FSDP2Strategy(sequence_parallel_size=0)


def test_both_parts_get_the_same_layout_and_a_trainer_without_it_is_refused_in_one_line():
    module = SFTLitModule(TINY_QWEN)
    data = ChatMLDataModule(train_path=str(ROOT / "data" / "chatml_data.json"), tokenizer_path=TINY_QWEN,
                            batch_size=16, max_length=64, cache_dir=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="no run layout: give the Trainer the callback .*ConnectRunLayout"):
        trainer.fit(module, data)
    module, data = SFTLitModule(TINY_QWEN), ChatMLDataModule(
        train_path=str(ROOT / "data" / "chatml_data.json"), tokenizer_path=TINY_QWEN, batch_size=16, max_length=64,
        cache_dir=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ConnectRunLayout(module, data)])
    trainer.fit(module, data)
    assert module.layout is data.layout and module.layout.accumulation == 3 and module.layout.loss_divisor == 3
