"""Batched generation that stops at the end-of-turn token; shared by predict, chat and tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch


@dataclass(frozen=True)
class GenerationSettings:
    """How predict and chat generate: ``temperature`` 0 decodes greedily, above 0 samples at that temperature
    within the ``top_p`` nucleus (one knob for both, as in the OpenAI and vLLM APIs)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}


class Reply(NamedTuple):
    text: str
    stopped: bool  # ended with an end-of-turn token, not by running into max_new_tokens
    tokens: int  # generated, the end-of-turn token included


@torch.no_grad()  # not inference_mode: FSDP2 keeps the weights it gathers, and inference tensors cannot be reused
def generate_replies(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    stops: list[int],
    streamer=None,
    synced: bool = False,
    limits: Optional[Sequence[int]] = None,
) -> list[Reply]:
    """Replies to left-padded prompts, cut at the first of ``stops`` (see ``render.stop_token_ids``) and
    decoded without special tokens. ``streamer``: a transformers streamer that receives tokens as they come.
    ``synced``: the model is sharded over ranks (FSDP2, ZeRO-3), so every rank runs a forward until all are done.
    ``limits``: each row's own most new tokens (at most ``settings.max_new_tokens``): a reply is as if generated
    alone, whichever rows share its batch."""
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        synced_gpus=synced,
        **settings.kwargs(),
    )
    replies = []
    rows = output[:, input_ids.shape[1] :].tolist()
    for row, limit in zip(rows, limits or [settings.max_new_tokens] * len(rows)):
        row = row[:limit]
        end = next((i for i, token in enumerate(row) if token in stops), None)
        # Rows that stopped early are padded to the longest; a row that never stopped used every new token it had.
        tokens = len(row) if end is None else end + 1
        replies.append(Reply(tokenizer.decode(row[:end], skip_special_tokens=True), end is not None, tokens))
    return replies
