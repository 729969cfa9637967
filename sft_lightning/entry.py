"""The ``sft-lightning`` console script: answers that need no model code come back at once.

Importing Lightning (with torch, transformers and torchmetrics) takes seconds; ``sft-lightning --help``, a seed
trainer's flag and a missing config, data file or model folder (:mod:`sft_lightning.preflight`) are answered
before that, and everything else goes to :func:`sft_lightning.cli.cli_main`.
"""

from __future__ import annotations

import difflib
import sys
from typing import NoReturn

from sft_lightning.errors import USER_ERRORS
# The seed trainer's flags (sft_train.py, inference.py) and ours, so that a seed user's command gets one line back.
SEED_FLAGS = {
    "--model_name": "--model.model_name_or_path", "--data_path": "--data.train_path (predict: --data.predict_path)",
    "--output_dir": "--trainer.default_root_dir", "--num_epochs": "--trainer.max_epochs",
    "--num_train_epochs": "--trainer.max_epochs", "--batch_size": "--data.batch_size",
    "--per_device_train_batch_size": "--data.batch_size", "--learning_rate": "--model.learning_rate",
    "--gradient_accumulation_steps": "--trainer.accumulate_grad_batches", "--max_length": "--data.max_length",
    "--warmup_ratio": "--model.warmup_ratio", "--weight_decay": "--model.weight_decay",
    "--fp16": "--trainer.precision=16-mixed", "--bf16": "--trainer.precision=bf16-mixed",
    "--mode": "sft-lightning chat (--mode chat) or sft-lightning predict (--mode batch)",
    "--system_prompt": "sft-lightning chat --system_prompt",
}
# The seed trainer's flags that a verb has as options of its own.
OWN_SEED_FLAGS = {"chat": ("--system_prompt",), "export": ("--output_dir",)}
VERBS = ("fit", "validate", "test", "predict", "chat", "export", "estimate", "data")
USAGE = """usage: sft-lightning VERB [options]   (sft-lightning VERB --help for a verb's options)

Supervised fine-tuning of Hugging Face causal LMs on chat conversations.

training and evaluation (LightningCLI: --config FILE, --model.*, --data.*, --trainer.*):
  fit            train; exports the best weights as hf_model/ in the run's log directory
  validate       val_loss, val_ppl and val_acc on data.val_path
  test           the same metrics on data.test_path
  predict        generate answers for data.predict_path into --output_path, scored against references

tools:
  chat           talk to a model (a Hugging Face folder or a checkpoint) in the terminal or through a pipe
  export         write a checkpoint as a Hugging Face folder that plain transformers can load
  estimate       memory per GPU and host RAM for a config, before renting GPUs
  data sample    write example ChatML conversations
  data convert   ShareGPT or Alpaca to ChatML messages
  data check     a config's data as fit sees it: rendered samples, trained tokens, statistics, checks
  data prepare   tokenise a config's data into its cache ahead of the GPU job

example: sft-lightning fit --config configs/tiny.yaml"""


def answered_without_loading(argv: list[str]) -> bool:
    """Answer ``--help`` (or no arguments) and a seed trainer's flag, which need no model code; False otherwise.
    A seed flag is one line on stderr and exit status 2, like every user error."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return True
    if argv[0] not in VERBS:  # rather than Lightning's parser, which would send them to `VERB --help` of no verb
        close = difflib.get_close_matches(argv[0], VERBS, n=1)
        found = (f"no verb before {argv[0]}: sft-lightning VERB [options]" if argv[0].startswith("-")
                 else f"no verb {argv[0]!r}{f' (did you mean {close[0]}?)' if close else ''}")
        print(f"sft-lightning: error: {found}; sft-lightning --help lists them", file=sys.stderr)
        sys.exit(2)
    own = OWN_SEED_FLAGS.get(argv[0], ())
    flags = list(dict.fromkeys(flag for flag in (arg.split("=")[0] for arg in argv) if flag in SEED_FLAGS and flag not in own))
    if not flags:
        return False
    if len(flags) == 1:
        found = f"{flags[0]} is a flag of the seed trainer; here it is {SEED_FLAGS[flags[0]]}"
    else:  # all of them at once, not one per run
        found = "flags of the seed trainer: " + "; ".join(f"{flag} is {SEED_FLAGS[flag]} here" for flag in flags)
    print(f"sft-lightning: error: {found} (README: From the seed trainer)", file=sys.stderr)
    sys.exit(2)


def exit_with(error: Exception | str) -> NoReturn:
    """A user error: one line on stderr, exit status 2, no traceback."""
    print(f"sft-lightning: error: {error}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    if answered_without_loading(sys.argv[1:]):
        return
    from sft_lightning.preflight import preflight

    try:
        preflight(sys.argv[1:])
    except USER_ERRORS as error:
        exit_with(error)
    from sft_lightning.cli import cli_main

    cli_main()  # reads sys.argv itself, as LightningCLI expects of a console script
