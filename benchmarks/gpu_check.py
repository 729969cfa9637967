"""The device check: one command, a few minutes on one H100/H200 (torch 2.11 or newer), nothing downloaded.

    python benchmarks/gpu_check.py             # all five parts below, on the first GPU
    python benchmarks/gpu_check.py --steps 4   # shorter (on a CPU: 32-true, the shipped tiny model's architecture)

1. Attention: the backend ``sdpa_varlen`` gets from this torch and GPU (the varlen kernel and which of its arguments
   the installed signature takes, or the per-sample fallback and why), its bf16 output against the per-sample SDPA
   loop, and the packing check's cross-sample influence measured through the real kernel (0 when samples are apart).
2. The qwen2.5-0.5b preset itself (its YAML: bf16-mixed, packed rows of 2048, accumulation 8) on the Qwen2.5-0.5B
   architecture with random weights: tokens/s and MFU, host syncs per micro-batch (CUDA's sync debug mode), peak
   reserved memory against ``sft-lightning estimate``'s plan; and a plain PyTorch loop on the same packed batches
   (bf16 autocast, transformers' own attention), for the ratio.
3. The qwen2.5-7b preset (FSDP2, activation checkpointing, accumulation 4 reduced once per step) on one GPU, with a
   4-layer slice of the Qwen2.5-7B architecture: MFU and reserved memory against the plan.
4. Linear attention: one Gated DeltaNet layer of Qwen3.5-27B (random weights, bf16 autocast) over a packed row of 16
   samples, 4096 tokens: flash-linear-attention's one call with the boundaries (where installed) against the layer
   run once per sample, max |diff| and forward+backward time of each.
5. Activation offloading: a 4-layer slice of Qwen2.5-7B (random weights, bf16, activation checkpointing) over one row
   of 16,384 tokens, forward+backward of its decoder layers with and without ``model.activation_offloading``: peak
   allocated memory beyond the weights and gradients of each, against the planner's figure for the layer inputs.

With ``--sequence_parallel N`` it runs one part instead, on N GPUs (``N`` processes; on a CPU, ``N`` gloo processes):

6. Long context: the llama3.1-8b-128k preset (FSDP2, ``sequence_parallel_size N``, activation checkpointing) on a
   4-layer slice of Llama-3.1-8B with random weights, at rows of 32k, 64k and 128k tokens of long conversations:
   tokens/s per GPU, peak allocated and reserved memory, against the planner's total per GPU for that slice.

    python benchmarks/gpu_check.py --sequence_parallel 8   # on one node of 8 GPUs

Each run writes its TensorBoard logs and the model folder under ``--out`` (default: a temporary folder, removed at
the end unless ``--keep``); no checkpoint and no export are written. Without CUDA the same path runs on the CPU at
``32-true`` with the shipped tiny model's architecture, which is how it is tested.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import TOKENIZER, WORDS, write_conversations  # noqa: E402

from sft_lightning.attention import SDPA_VARLEN, cross_sample_influence  # noqa: E402
from sft_lightning.cli import cli_main  # noqa: E402
from sft_lightning.language_model import prepare_for_training  # noqa: E402
from sft_lightning.linear_attention import delta_rule_kernel, packed_gated_delta_net  # noqa: E402
from sft_lightning.memory import GB, format_plan, model_config, plan_of_config  # noqa: E402
from sft_lightning.packing import collate_packed, pack_best_fit_decreasing  # noqa: E402
from sft_lightning.render import load_tokenizer  # noqa: E402
from sft_lightning.tokenized import tokenize_split  # noqa: E402
from sft_lightning.varlen import run_varlen, varlen_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


class CudaSyncs(Callback):
    """Counts, per training micro-batch, the operations CUDA's sync debug mode reports as making the host wait
    (``.item()``, a blocking copy, ``nonzero``, ...), from the start of the batch to its end; rank 0 writes the
    counts to ``path`` (JSON). On a CPU there is nothing to count."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.counts: list[int] = []
        self._catching = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if CUDA:
            self._catching = warnings.catch_warnings(record=True)
            self._records = self._catching.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._catching is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catching.__exit__(None, None, None)
            self._catching = None
            self.counts.append(sum("synchroniz" in str(record.message) for record in self._records))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.counts))


def write_model(folder: Path, arch: str, layers: int) -> Path:
    """A random model of a shipped architecture (``configs/models/``), ``layers`` decoder layers, saved in bf16
    (small on disk; the run loads it in the preset's dtype), with the shipped ChatML tokenizer."""
    config = model_config(arch)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


def attention_check(model_dir: Path) -> None:
    device = torch.device("cuda" if CUDA else "cpu")
    kernel = varlen_kernel(device)
    described = "none: packed samples run one at a time through SDPA" if kernel is None else (
        f"torch.nn.attention.varlen.varlen_attn (scale {kernel.takes_scale}, window_size {kernel.takes_window}, "
        f"enable_gqa {kernel.takes_gqa}, is_causal {kernel.takes_is_causal})")
    name = torch.cuda.get_device_name() if CUDA else "CPU"
    capability = "sm%d%d" % torch.cuda.get_device_capability() if CUDA else "-"
    print(f"\n[1] attention: torch {torch.__version__}, {name} ({capability})\n  varlen kernel: {described}")
    if kernel is not None:
        torch.manual_seed(0)
        bounds = torch.tensor([0, 700, 1500, 2048], dtype=torch.int32, device=device)
        query = torch.randn(2048, 14, 64, device=device)  # fp32 q/k with bf16 v: what bf16 autocast hands over
        key = torch.randn(2048, 2, 64, device=device)
        value = torch.randn(2048, 2, 64, device=device, dtype=torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = run_varlen(kernel, query, key, value, bounds, 800, None, None)
        ends = bounds.tolist()
        worst = 0.0
        for start, end in zip(ends, ends[1:]):
            q, k, v = (t[start:end].transpose(0, 1)[None].to(torch.bfloat16) for t in (query, key, value))
            loop = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            worst = max(worst, (output[start:end] - loop[0].transpose(0, 1)).abs().max().item())
        print(f"  kernel against the per-sample SDPA loop, bf16, 3 samples of 700/800/548 tokens: max |diff| {worst:.3g}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=SDPA_VARLEN).to(device).eval()
    tokens = torch.randint(0, len(load_tokenizer(str(model_dir))), (256,), device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=CUDA):
        influence = cross_sample_influence(model, tokens[:128], tokens[128:], SDPA_VARLEN).item()
    print(f"  packing check through it (two packed spans of 128 tokens, the model's own forward): influence {influence:.3g}")


def linear_attention_check(repeats: int = 3) -> None:
    from transformers.models.qwen3_5 import modeling_qwen3_5

    device = torch.device("cuda" if CUDA else "cpu")
    kernel = delta_rule_kernel(device)
    print("\n[4] linear attention (Gated DeltaNet): " + ("flash-linear-attention's chunk_gated_delta_rule, one call "
          "per layer" if kernel else "no flash-linear-attention kernel here: the delta rule once per sample"))
    config = model_config("Qwen/Qwen3.5-27B" if CUDA else str(ROOT / "models" / "tiny-qwen3.5"))
    torch.manual_seed(0)
    layer = modeling_qwen3_5.Qwen3_5GatedDeltaNet(config, 0).to(device)
    total = 4096 if CUDA else 256
    ends = sorted(torch.randperm(total - 1)[:15].add(1).tolist())
    bounds = torch.tensor([0, *ends, total], device=device)
    hidden = torch.randn(1, total, config.hidden_size, device=device, requires_grad=True)

    def timed(run):
        seconds, output = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=CUDA):
                output = run()
            output.float().square().mean().backward()
            if CUDA:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return output.detach().float(), min(seconds)

    packed, packed_s = timed(lambda: packed_gated_delta_net(layer, modeling_qwen3_5.torch_chunk_gated_delta_rule,
                                                            hidden, bounds))
    edges = bounds.tolist()
    alone, alone_s = timed(lambda: torch.cat([layer(hidden[:, a:b]) for a, b in zip(edges, edges[1:])], dim=1))
    print(f"  packed row of 16 samples, {total} tokens: max |diff| against the layer per sample "
          f"{(packed - alone).abs().max().item():.3g}; forward+backward {packed_s * 1e3:.1f} ms against "
          f"{alone_s * 1e3:.1f} ms per sample ({alone_s / packed_s:.2f}x)")


def offloading_check() -> None:
    device = torch.device("cuda" if CUDA else "cpu")
    config = model_config("Qwen/Qwen2.5-7B-Instruct" if CUDA else str(ROOT / "models" / "tiny-qwen2"))
    config.num_hidden_layers = 4 if CUDA else config.num_hidden_layers
    tokens, dtype = (16384, torch.bfloat16) if CUDA else (256, torch.float32)
    print(f"\n[5] activation offloading: {config.num_hidden_layers} layers of {config.hidden_size}, {tokens} tokens")
    peaks = []
    for offload in (False, True):
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        prepare_for_training(model, config.vocab_size, True, True, offload, None)
        model.train()
        ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
        if CUDA:
            model.model(input_ids=ids, use_cache=False).last_hidden_state.float().square().mean().backward()  # gradients allocated
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        model.model(input_ids=ids, use_cache=False).last_hidden_state.float().square().mean().backward()
        peaks.append(torch.cuda.max_memory_allocated() - before if CUDA else float("nan"))
        del model
    layer_inputs = config.num_hidden_layers * tokens * config.hidden_size * torch.finfo(dtype).bits / 8
    print(f"  peak beyond weights and gradients: {peaks[0] / GB:.2f} GB without, {peaks[1] / GB:.2f} GB with "
          f"offloading (the planner moves the layer inputs, {layer_inputs / GB:.2f} GB)" if CUDA else
          "  no accelerator: the activations are in host memory already, nothing to offload")


def preset_run(preset: str, out: Path, model_dir: Path, data: Path, steps: int) -> dict:
    """``fit --config`` a preset written for this machine (one device, this run's model and data, no checkpoint);
    returns the last logged scalars, the syncs per micro-batch and the plan of that very config."""
    raw = yaml.safe_load((ROOT / "configs" / preset).read_text())
    trainer, model = raw["trainer"], raw["model"]
    trainer.update(devices=1, num_nodes=1, max_steps=steps, max_epochs=-1, default_root_dir=str(out),
                   log_every_n_steps=max(steps // 2, 1), enable_progress_bar=False, val_check_interval=None,
                   accelerator="gpu" if CUDA else "cpu")
    if not CUDA:  # bf16 autocast is ~15x slower on a CPU; DDP of one CPU process is the plain loop with a wrapper
        trainer["precision"] = "32-true"
        trainer["strategy"] = trainer["strategy"] if isinstance(trainer.get("strategy"), dict) else "auto"
    model.update(model_name_or_path=str(model_dir), learning_rate=1e-4, warmup_ratio=0.1)
    raw["data"].update(train_path=str(data), val_path=None, cache_dir=str(out / "cache"), num_workers=2)
    if not CUDA:
        raw["data"].update(max_length=256)
    raw["checkpoint"] = {"save_top_k": 0, "save_last": False, "every_n_train_steps": 0}
    out.mkdir(parents=True, exist_ok=True)
    config = out / preset
    config.write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    cli_main(["fit", "--config", str(config), "--trainer.callbacks+=gpu_check.CudaSyncs",
              f"--trainer.callbacks.path={out / 'syncs.json'}"])
    run = max((out / "lightning_logs").glob("version_*"), key=lambda path: path.stat().st_mtime)
    events = EventAccumulator(str(run))
    events.Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    syncs = json.loads((out / "syncs.json").read_text())
    plan, _, precision = plan_of_config(str(config))
    return {"scalars": last, "syncs": syncs, "plan": plan, "precision": precision, "config": raw,
            "wall_s": time.perf_counter() - started}


def report(title: str, result: dict, layers: int, arch: str) -> None:
    raw = result["config"]
    tokens = raw["data"]["batch_size"] * raw["data"]["max_length"]
    print(f"\n{title}: {arch} ({layers} layers), {result['precision']}, {tokens} packed tokens per micro-batch x "
          f"{raw['trainer'].get('accumulate_grad_batches', 1)} accumulation, {raw['trainer']['max_steps']} steps, "
          f"{result['wall_s']:.0f} s in all")
    for tag in ("throughput/tokens_per_s", "throughput/mfu", "throughput/padding_fraction", "memory/peak_gb",
                "memory/peak_reserved_gb", "train_loss"):
        if tag in result["scalars"]:
            print(f"  {tag:34s} {result['scalars'][tag]:.4g}")
    steady = result["syncs"][2 * raw["trainer"].get("accumulate_grad_batches", 1):]
    if steady:
        # Expected: 1 in the last micro-batch of each optimizer step (the non-finite guard), 0 in the others, more
        # only where a step logs (Lightning reads the logged values back then).
        seen = ", ".join(f"{syncs} in {count}" for syncs, count in sorted(Counter(steady).items()))
        print(f"  host syncs per micro-batch after the first optimizer steps: {seen} micro-batches")
    elif not CUDA:
        print("  host syncs per micro-batch: counted on a GPU only (tests/test_syncs.py counts them on a CPU)")
    print("  " + format_plan(result["plan"], arch, result["precision"], 80.0).replace("\n", "\n  "))
    reserved = result["scalars"].get("memory/peak_reserved_gb")
    if reserved is not None:
        print(f"  measured peak reserved / planned total: {reserved * GB / result['plan'].total:.2f}")


def plain_loop(model_dir: Path, data: Path, batch_size: int, max_length: int, steps: int) -> float:
    """Tokens/s of a hand-written loop on the same packed rows: transformers' forward with labels under bf16 autocast
    (flash_attention_2 where installed, else sdpa with the block mask), backward, AdamW."""
    device = torch.device("cuda" if CUDA else "cpu")
    tokenizer = load_tokenizer(str(model_dir))
    split = tokenize_split(str(data), tokenizer, max_length, "assistant")
    rows = pack_best_fit_decreasing(list(split.lengths), max_length)[: steps * batch_size]
    batches = [collate_packed([[split.sample(i) for i in row] for row in rows[b : b + batch_size]], tokenizer.pad_token_id)
               for b in range(0, len(rows), batch_size)]
    try:
        import flash_attn  # noqa: F401

        attention = "flash_attention_2"
    except ImportError:
        attention = "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timed, tokens = 0.0, 0
    for index, batch in enumerate(batches):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=CUDA):
            # use_cache=False: with a cache transformers skips the packed-sample mask.
            loss = model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                         labels=batch.labels.to(device), use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()
        if index >= 2:  # after warm-up, as the throughput logger's last interval
            timed += time.perf_counter() - started
            tokens += batch.counts.tokens
    return tokens / max(timed, 1e-9)


def write_long_conversations(path: Path, conversations: int, words: int, seed: int) -> Path:
    """Multi-turn conversations of about ``words`` words each (turns of 200-2,000 words), as JSONL."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for _ in range(conversations):
            messages, left = [], words
            while left > 0:
                turn = min(rng.randint(100, 1000), left)
                messages += [{"role": "user", "content": " ".join(rng.choices(WORDS, k=turn))},
                             {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=turn))}]
                left -= 2 * turn
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def sequence_parallel_check(size: int, out: Path, steps: int) -> None:
    """Part 6: the long-context preset on ``size`` devices with sequence parallelism at growing row lengths."""
    arch = "meta-llama/Llama-3.1-8B-Instruct" if CUDA else str(ROOT / "models" / "tiny-llama3.1")
    layers = 4 if CUDA else model_config(arch).num_hidden_layers
    lengths = (32768, 65536, 131072) if CUDA else (1024,)
    model_dir = write_model(out / "llama3.1-8b-slice", arch, layers)
    print(f"\n[6] long context: llama3.1-8b-128k.yaml, {arch} ({layers} layers), {size} devices x sequence parallel "
          f"{size}, {steps} steps per length")
    for length in lengths:
        data = write_long_conversations(out / f"long-{length}.jsonl", 4 * steps + 4, length // 3, seed=length)
        raw = yaml.safe_load((ROOT / "configs" / "llama3.1-8b-128k.yaml").read_text())
        raw["trainer"].update(devices=size, num_nodes=1, max_steps=steps, max_epochs=-1, log_every_n_steps=1,
                              enable_progress_bar=False, val_check_interval=None, accumulate_grad_batches=1,
                              default_root_dir=str(out / f"run-{length}"), accelerator="gpu" if CUDA else "cpu")
        raw["trainer"]["strategy"]["init_args"]["sequence_parallel_size"] = size
        if not CUDA:
            raw["trainer"]["precision"] = "32-true"
        raw["model"].update(model_name_or_path=str(model_dir), learning_rate=1e-5)
        raw["data"].update(train_path=str(data), val_path=None, max_length=length, cache_dir=str(out / "cache"))
        raw["checkpoint"] = {"save_top_k": 0, "save_last": False, "every_n_train_steps": 0}
        config = out / f"long-{length}.yaml"
        config.write_text(yaml.safe_dump(raw))
        # A process per device: Lightning launches the other ranks by running this command line again.
        run = subprocess.run([sys.executable, "-m", "sft_lightning.cli", "fit", "--config", str(config)], cwd=ROOT,
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"  {length} tokens: failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        events = EventAccumulator(str(out / f"run-{length}" / "lightning_logs" / "version_0"))
        events.Reload()
        last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
        plan = plan_of_config(str(config))[0]
        # tokens/s is over every rank of the run; a sequence group shares each row, so per device is / size.
        print(f"  {length:6d} tokens: {last.get('throughput/tokens_per_s', float('nan')) / size:.4g} tokens/s per device, "
              f"peak {last.get('memory/peak_gb', float('nan')):.2f} GB allocated, "
              f"{last.get('memory/peak_reserved_gb', float('nan')):.2f} GB reserved; planned {plan.total / GB:.1f} GB "
              f"per GPU; loss {last.get('train_loss', float('nan')):.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each preset run")
    parser.add_argument("--slice_layers", type=int, default=4, help="decoder layers of the Qwen2.5-7B slice")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep --out's folder (models and logs; never checkpoints)")
    parser.add_argument("--sequence_parallel", type=int, default=0,
                        help="run part 6 alone: the long-context preset on this many devices with sequence parallelism")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.sequence_parallel:
        try:
            sequence_parallel_check(args.sequence_parallel, out, max(args.steps // 4, 2))
        finally:
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        return
    # The CPU (the smoke test) has no room for these widths and 152k-token embeddings: the shipped tiny Qwen2 there.
    tiny = str(ROOT / "models" / "tiny-qwen2")
    arch_small, arch_slice = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct") if CUDA else (tiny, tiny)
    small_layers = model_config(arch_small).num_hidden_layers
    slice_layers = args.slice_layers if CUDA else small_layers
    try:
        small = write_model(out / "qwen2.5-0.5b", arch_small, small_layers)
        attention_check(small)
        # Enough long-tailed conversations for every micro-batch of the run (~150 tokens each).
        tokens_needed = args.steps * 8 * 4 * (2048 if CUDA else 256)
        data = Path(write_conversations(out / "train.jsonl", tokens_needed // 150 + 200, 2048 if CUDA else 256, seed=0))
        result = preset_run("qwen2.5-0.5b.yaml", out / "run-0.5b", small, data, args.steps)
        report("[2] qwen2.5-0.5b.yaml", result, small_layers, arch_small)
        raw = result["config"]["data"]
        plain = plain_loop(small, data, raw["batch_size"], raw["max_length"], steps=12)
        ours = result["scalars"].get("throughput/tokens_per_s", float("nan"))
        print(f"  plain PyTorch loop, same packed rows: {plain:.4g} tokens/s; sft-lightning / plain: {ours / plain:.2f}")
        shutil.rmtree(small)
        sliced = write_model(out / "qwen2.5-7b-slice", arch_slice, slice_layers)
        result = preset_run("qwen2.5-7b.yaml", out / "run-7b", sliced, data, max(args.steps // 2, 2))
        report("[3] qwen2.5-7b.yaml on one device", result, slice_layers, arch_slice)
        linear_attention_check()
        offloading_check()
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
