"""``sft-lightning data check --config C``: a pre-flight report on the data exactly as ``fit`` would load it.

Shows rendered samples with the trained tokens highlighted (and wrapped in ``⟦ ⟧`` so logs keep it), the
statistics that decide cost (lengths, truncation, drops, supervised share, padding under the configured
batching) and the checks behind the field's silent failures. Exits non-zero when a check fails or a threshold
is exceeded, so it can gate a training job.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import GenerationConfig

from sft_lightning.errors import CheckFailed, ConfigError, DataError, TemplateError
from sft_lightning.lightning_cli import SFTLightningCLI
from sft_lightning.memory import GB, fitting_sequence_parallel, plan_of_config
from sft_lightning.mixture import SampleSet, SourceSamples
from sft_lightning.records import read_records
from sft_lightning.render import IGNORE_INDEX, end_of_turn_token_id, training_samples
from sft_lightning.sampling import Batching

STAGES = {"train": "fit", "val": "validate", "test": "test"}
# The trainer is not used here: a GPU or multi-node config is checked on any machine.
TRAINER_OVERRIDES = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                     "--trainer.num_nodes=1", "--trainer.logger=false"]


class Outcome(NamedTuple):
    name: str
    status: Literal["pass", "fail", "warn"]
    detail: str


def check(
    config: str,
    split: Literal["train", "val", "test"] = "train",
    samples: int = 2,
    max_truncated_fraction: float = 0.05,
    max_dropped_fraction: float = 0.01,
    overrides: tuple[str, ...] = (),
) -> None:
    """Pre-flight report on a config's data: highlighted samples, statistics and checks.

    Args:
        config: a ``sft-lightning fit`` config (its model, tokenizer and data settings are used as fit would);
            ``--model.*`` and ``--data.*`` options after it override the config's, as they do for fit
            (``--data.train_path mine.jsonl`` checks your own file).
        split: which data of the config to check (each of its sources is reported and checked on its own).
        samples: how many rendered conversations to show.
        max_truncated_fraction: fail when more conversations than this are cut at ``data.max_length``.
        max_dropped_fraction: fail when more conversations than this are dropped (invalid, or nothing left to train).
        overrides: the ``--model.*`` and ``--data.*`` options given after the config.
    """
    cli = SFTLightningCLI(args=["--config", config, *overrides, *TRAINER_OVERRIDES], run=False)
    data, model_path = cli.datamodule, cli.model.hparams.model_name_or_path
    console = Console(highlight=False)
    try:
        data.setup(STAGES[split])
    except (DataError, TemplateError) as err:
        _report(console, [Outcome("renders and masks with the chat template", "fail", str(err))])
        raise CheckFailed(f"data check failed: {err}") from None
    mixture, tokenizer = data.splits[split], data.tokenizer
    eot = end_of_turn_token_id(tokenizer)
    for index in range(min(samples, len(mixture))):
        console.print(Text(f"sample {index + 1} (trained tokens in bold green and ⟦ ⟧):", style="bold"))
        console.print(highlighted(mixture, index, tokenizer))
        console.print()
    outcomes = [Outcome("renders and masks with the chat template", "pass", "every turn after its inference prompt, closed by a special end-of-turn token")]
    several = len(mixture.sources) > 1
    for number, source in enumerate(mixture.sources, start=1):
        # Each source is read, counted and checked on its own, so a problem names the source it is in.
        title = f"{split} source {number}/{len(mixture.sources)}: {source.path}" if several else f"{split}: {source.path}"
        records = [r for file in source.source.files for r in read_records(file, skipped=Counter(), format=source.source.format)]
        console.print(statistics(source, title, records, None if several else data.batching(split)))
        found = checks(source, tokenizer, eot, data.hparams.max_length)
        found.append(foreign_text_check(records, tokenizer, data.hparams))
        found += thresholds(source, max_truncated_fraction, max_dropped_fraction)
        outcomes += [o._replace(name=f"source {number}: {o.name}") for o in found] if several else found
    outcomes.append(generation_check(model_path, eot))
    effective = cli.parser.parse_args(["--config", config, *overrides])
    if effective.trainer.accelerator != "cpu":  # a GPU config: does a row of max_length fit its GPUs?
        outcomes.append(memory_check(cli.parser.dump(effective, skip_check=True)))
    if several:
        console.print(mixture.summary(split))
        console.print(f"{split} batching: {data.batching(split)}")
    _report(console, outcomes)
    failed = [o.name for o in outcomes if o.status == "fail"]
    if failed:
        raise CheckFailed(f"data check failed: {'; '.join(failed)}")


def highlighted(tokenized: SampleSet, index: int, tokenizer) -> Text:
    """The sample's text, trained tokens bold green inside ``⟦ ⟧``, the rest dim."""
    ids, labels = tokenized.sample(index)
    text = Text()
    trained = labels != IGNORE_INDEX
    start = 0
    for end in [*np.flatnonzero(np.diff(trained.astype(int))) + 1, len(ids)]:
        piece = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False)
        if trained[start]:
            text.append(f"⟦{piece}⟧", style="bold green")
        else:
            text.append(piece, style="dim")
        start = end
    return text


def statistics(tokenized: SampleSet, title: str, records, batching: Optional[Batching]) -> Table:
    """Counts, lengths and supervision of a source's kept samples; ``batching``: how its split is batched."""
    lengths = np.asarray(tokenized.lengths)
    supervised = sum(tokenized.supervised_tokens)
    turns = Counter(m["role"] for r in records for m in r.messages)
    table = Table(title=title, show_header=False)
    rows = [
        ("conversations", f"{tokenized.read} read, {len(tokenized)} kept"),
        ("dropped", ", ".join(f"{n} {why}" for why, n in tokenized.dropped.items()) or "none"),
        ("truncated at max_length", f"{tokenized.truncated} ({tokenized.truncated / max(tokenized.read, 1):.1%})"),
        ("turns", f"{turns['user']} user, {turns['assistant']} assistant, {turns['system']} system"
                  + (f", {turns['tool']} tool" if turns["tool"] else "")),
        # Chat templates that rewrite earlier turns; tokens that would merge across a prompt/answer boundary.
        ("split by turn / by prompt", f"{tokenized.expanded} / {tokenized.boundary} conversations"),
        ("tokens", f"{int(lengths.sum())} (mean {lengths.mean():.1f})"),
        ("length p50 / p90 / p99 / max", " / ".join(str(int(np.percentile(lengths, q))) for q in (50, 90, 99, 100))),
        ("supervised tokens", f"{supervised} ({supervised / lengths.sum():.1%} of all tokens)"),
        *([("batching", str(batching))] if batching is not None else []),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def checks(tokenized: SampleSet, tokenizer, eot: int, max_length: int) -> list[Outcome]:
    """What each sample must hold: every trained span closed by the end-of-turn token, one BOS at most."""
    untrained = [i for i in range(len(tokenized)) if not _every_turn_ends_trained(*tokenized.sample(i), eot, max_length)]
    outcomes = [Outcome(
        "end-of-turn trained in every sample", "fail" if untrained else "pass",
        f"{tokenizer.convert_ids_to_tokens(eot)} closes every trained span"
        if not untrained else f"{len(untrained)} samples (first: {untrained[0] + 1}) have a trained span not closed by it",
    )]
    bos = tokenizer.bos_token_id
    doubled = [i for i in range(len(tokenized)) if bos is not None and tokenized.sample(i)[0][:2].tolist() == [bos, bos]]
    outcomes.append(Outcome("no double BOS", "fail" if doubled else "pass",
                            f"{len(doubled)} samples start with two BOS tokens" if doubled else "one BOS at most"))
    return outcomes


# Texts shorter than this are left out of the foreign-text check: an answer may well repeat a short word of the user's.
SHORTEST_FOREIGN_TEXT = 12
# Conversations rendered again for the check (each source's first ones).
FOREIGN_TEXT_RECORDS = 1000


def foreign_text(messages: list[dict], tools: Optional[list[dict]], trained: list[str]) -> Optional[tuple[str, str]]:
    """(role, text) of the first text of another role that a trained span holds (a system prompt, a user's or a
    tool's words, a tool schema's description), or None. Such a span means the template's turns were misread."""
    others = [(m["role"], m["content"].strip()) for m in messages if m["role"] != "assistant"]
    others += [("tool schema", (tool.get("function") or tool).get("description", "").strip()) for tool in tools or ()]
    return next(((role, text) for role, text in others
                 if len(text) >= SHORTEST_FOREIGN_TEXT and any(text in span for span in trained)), None)


def trained_spans(samples, tokenizer) -> list[str]:
    """The trained spans of ``samples`` (``training_samples``), each decoded where it stands: a SentencePiece span
    decoded on its own would lose its leading "▁"."""
    spans = []
    for sample in samples:
        start = None
        for position, label in enumerate([*sample.labels, IGNORE_INDEX]):
            if label != IGNORE_INDEX and start is None:
                start = position
            elif label == IGNORE_INDEX and start is not None:
                before = tokenizer.decode(sample.input_ids[:start])
                spans.append(tokenizer.decode(sample.input_ids[:position])[len(before) :])
                start = None
    return spans


def foreign_text_check(records, tokenizer, settings) -> Outcome:
    """No trained span holds another role's text: the last guard against a template whose turns were misread."""
    name = "trained spans hold assistant text only"
    if settings.train_on == "all":
        return Outcome(name, "pass", "data.train_on all trains every token by design")
    for record in records[:FOREIGN_TEXT_RECORDS]:
        try:
            samples = training_samples(record.messages, tokenizer, settings.train_on, settings.max_length, record.tools,
                                       settings.system_message, settings.split_special_tokens)
            found = foreign_text(record.messages, record.tools, trained_spans(samples, tokenizer))
        except TemplateError:
            continue  # dropped or refused: reported by the other checks
        if found is not None:
            role, text = found
            return Outcome(name, "fail", f"{record.location}: a trained span holds the {role} text {text[:50]!r}: "
                                         "the chat template's turns are misread; report it with the template")
    return Outcome(name, "pass", f"no system, user, tool or schema text in the trained spans of the first "
                                 f"{min(len(records), FOREIGN_TEXT_RECORDS)} conversations")


def generation_check(model_path: str, eot: int) -> Outcome:
    """The model's own: does generation stop at the end-of-turn token by itself."""
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    stops = eot in eos
    return Outcome(
        "generation_config eos includes the end-of-turn token", "pass" if stops else "warn",
        f"eos {eos}" if stops else f"eos {eos or 'not set'} lacks {eot}: generation would not stop by itself; "
        "the hf_model/ that fit exports has it set",
    )


def _every_turn_ends_trained(ids: np.ndarray, labels: np.ndarray, eot: int, max_length: int) -> bool:
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    ends = trained[np.append(np.diff(trained) > 1, True)] if len(trained) else trained
    cut_off = len(ids) >= max_length  # the last span may run into the truncation
    return all(ids[end] == eot or (cut_off and end == len(ids) - 1) for end in ends)


def memory_check(effective_config: str, gpu_memory_gb: float = 80.0) -> Outcome:
    """Whether a row of ``data.max_length`` tokens fits the config's own GPUs (``sft-lightning estimate``'s plan of
    the config as given, options included), and if not, which sequence-parallel size would make it fit."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(effective_config)
        try:
            plan, _, _ = plan_of_config(str(path))
        except ConfigError as err:
            return Outcome("memory per GPU at max_length", "warn", f"not planned: {err}")
        advice = fitting_sequence_parallel(str(path), plan, None, None, gpu_memory_gb).strip()
    size = f" x sequence parallel {plan.sequence_parallel}" if plan.sequence_parallel > 1 else ""
    detail = f"{plan.total / GB:.1f} GB planned per GPU on {plan.gpus} GPU{'s' * (plan.gpus > 1)}{size} ({plan.sharding.name})"
    if plan.total <= gpu_memory_gb * GB:
        return Outcome("memory per GPU at max_length", "pass", f"{detail}: fits {gpu_memory_gb:g} GB")
    return Outcome("memory per GPU at max_length", "warn",
                   f"{detail}: more than {gpu_memory_gb:g} GB; {advice or 'shorten data.max_length or add GPUs'}")


def thresholds(tokenized: SourceSamples, max_truncated: float, max_dropped: float) -> list[Outcome]:
    truncated = tokenized.truncated / max(tokenized.read, 1)
    dropped = sum(tokenized.dropped.values()) / max(tokenized.read, 1)
    return [
        Outcome("truncated fraction", "fail" if truncated > max_truncated else "pass",
                f"{truncated:.1%} (at most {max_truncated:.1%}: --max_truncated_fraction)"),
        Outcome("dropped fraction", "fail" if dropped > max_dropped else "pass",
                f"{dropped:.1%} (at most {max_dropped:.1%}: --max_dropped_fraction)"),
    ]


def _report(console: Console, outcomes: list[Outcome]) -> None:
    table = Table(title="checks", show_header=False)
    marks = {"pass": "[green]PASS[/]", "fail": "[bold red]FAIL[/]", "warn": "[yellow]WARN[/]"}
    for outcome in outcomes:
        table.add_row(marks[outcome.status], outcome.name, outcome.detail)
    console.print(table)
