"""``sft-lightning data prepare``: tokenise a config's data into its cache ahead of the GPU job.

Like ``axolotl preprocess``: run it on a CPU machine (or on the login node) with the config the job will use, and
``fit`` then reads every split from the cache instead of tokenising while the GPUs wait. The cache is keyed by each
file's content, format, tokenizer, template, ``max_length`` and ``train_on`` (not by paths or machines), so a cache
folder copied to another machine, or to shared storage, serves the same config there.
"""

from __future__ import annotations

from sft_lightning.data_check import TRAINER_OVERRIDES
from sft_lightning.errors import ConfigError
from sft_lightning.lightning_cli import SFTLightningCLI

SPLITS = ("train", "val", "test")


def prepare(config: str, overrides: tuple[str, ...] = ()) -> None:
    """Tokenise a config's training, validation and test data into its cache ahead of the job (fit then starts from it).

    Args:
        config: a ``sft-lightning fit`` config; ``--model.*`` and ``--data.*`` options after it override the config's,
            as they do for fit (``--data.cache_dir /shared/cache`` prepares into another folder).
        overrides: the ``--model.*`` and ``--data.*`` options given after the config.
    """
    cli = SFTLightningCLI(args=["--config", config, *overrides, *TRAINER_OVERRIDES], run=False)
    data = cli.datamodule
    if data.hparams.cache_dir is None:
        raise ConfigError(f"{config}: data.cache_dir is null, so there is no cache to prepare: give --data.cache_dir DIR")
    for name in SPLITS:
        if data.hparams[f"{name}_path"] is None:
            continue
        print(data.tokenized(name).summary(name))
        print(data.preparation(name))
    print(f"cache: {data.cache_folder}")
