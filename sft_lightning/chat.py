"""``sft-lightning chat``: talk to a trained model, rendered with exactly the code used in training.

Interactive on a terminal: line editing and input history (readline), tokens streamed, Ctrl-C stops a reply
(the exchange is dropped) without leaving, Ctrl-D or ``/exit`` leaves, ``/help`` lists the commands. From a pipe it
reads one user message per line and prints one reply per line with no decoration, so it scripts:
``printf 'hi\\n/exit\\n' | sft-lightning chat --model_path D``.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, Optional, TextIO

import torch
from transformers import TextStreamer

from sft_lightning.checkpoint_loading import load_trained_module
from sft_lightning.generation import GenerationSettings, generate_replies
from sft_lightning.module import SFTLitModule
from sft_lightning.render import render_prompt, render_text, stop_token_ids

COMMANDS = "/help, /reset (forget the conversation), /system <text> (set the system prompt and reset), /exit (or Ctrl-D)"
HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system <text>  set the system prompt and start a new conversation
  /exit           leave (Ctrl-D too)
  /help           this list
Ctrl-C stops a reply as it is written; arrow keys edit the line and walk the input history."""


class ChatSession:
    """A conversation with a model: the history, the system prompt, and one method to answer."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, system_prompt: Optional[str] = None) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.stops = stop_token_ids(tokenizer)
        self.system_prompt = system_prompt
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self, system_prompt: Optional[str] = None) -> None:
        if system_prompt is not None:
            self.system_prompt = system_prompt
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def prompt_text(self, user_text: str) -> str:
        """What the model would see after ``user_text``: the history rendered by the training template."""
        return render_text(self.tokenizer, self.messages + [{"role": "user", "content": user_text}], True)

    def reply(self, text: str, on_text: Optional[Callable[[str], None]] = None,
              stop: Optional["StopRequest"] = None) -> tuple[str, bool]:
        """Answer ``text``; ``on_text`` receives the reply piece by piece, and a Ctrl-C that ``stop`` records ends it
        at the next token (KeyboardInterrupt). Returns (reply, stopped at end-of-turn)."""
        self.messages.append({"role": "user", "content": text})
        # What a person types is text: "<|im_end|>" typed in a chat is not the end-of-turn token.
        prompt = render_prompt(self.messages, self.tokenizer, split_special_tokens=True)
        ids = torch.tensor([prompt], device=self.model.device)
        streamer = _Streamer(self.tokenizer, on_text, stop) if on_text else None
        try:
            if stop is not None:
                stop.replying, stop.requested = True, False
            answer = generate_replies(
                self.model, self.tokenizer, ids, torch.ones_like(ids), self.settings, self.stops, streamer
            )[0]
        except KeyboardInterrupt:  # stopped by the user: the exchange is not part of the conversation
            self.messages.pop()
            raise
        finally:
            if stop is not None:
                stop.replying = False
        self.messages.append({"role": "assistant", "content": answer.text})
        return answer.text, answer.stopped


class StopRequest:
    """Ctrl-C on a terminal as a flag while a reply is written, acted on by the streamer at the next token. The
    KeyboardInterrupt Python raises wherever the signal lands can be lost: an exception raised inside a finalizer or
    a weakref callback (generation runs many) is printed and dropped, and the reply then ran to max_new_tokens."""

    def __init__(self) -> None:
        self.replying = False
        self.requested = False

    def handle(self, signum, frame) -> None:
        if not self.replying:
            raise KeyboardInterrupt  # at the prompt: a fresh prompt, as in a shell
        self.requested = True


class _Streamer(TextStreamer):
    def __init__(self, tokenizer, on_text: Callable[[str], None], stop: Optional[StopRequest] = None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.stop = stop

    def put(self, value) -> None:
        # Called by generate after every token, in plain code: an exception raised here reaches the REPL.
        if self.stop is not None and self.stop.requested:
            raise KeyboardInterrupt
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.on_text(text)


def load_for_chat(model_path: Optional[str], ckpt_path: Optional[str], trust_remote_code: bool = False):
    """(model, tokenizer) from an exported/hub folder, or from a training checkpoint."""
    if ckpt_path is not None:
        module = load_trained_module(ckpt_path)
        return module.model.eval(), module.tokenizer
    if model_path is None:
        raise FileNotFoundError("chat needs --model_path (a model folder or hub name) or --ckpt_path")
    # The training module's own loader: same tokenizer set-up (ChatML fallback, resized embeddings) as fit.
    module = SFTLitModule(model_path, torch_dtype="auto", trust_remote_code=trust_remote_code)
    module.configure_model()
    return module.model.eval(), module.tokenizer


def chat(
    model_path: Optional[str] = None,
    ckpt_path: Optional[str] = None,
    system_prompt: Optional[str] = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    trust_remote_code: bool = False,
    show_prompt: bool = False,
) -> None:
    """Chat with a model: a REPL on a terminal, one reply per input line from a pipe.

    Args:
        model_path: exported folder (``hf_model/``) or hub name.
        ckpt_path: a training checkpoint, instead of ``model_path``.
        system_prompt: system message that opens every conversation (``/system`` changes it).
        max_new_tokens: most tokens per reply.
        temperature: 0 decodes greedily; above 0 samples at this temperature.
        top_p: nucleus sampling mass (when sampling).
        trust_remote_code: allow the model's own Python code.
        show_prompt: print the exact rendered prompt to stderr before each reply.
    """
    model, tokenizer = load_for_chat(model_path, ckpt_path, trust_remote_code)
    settings = GenerationSettings(max_new_tokens, temperature, top_p)
    session = ChatSession(model, tokenizer, settings, system_prompt)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {ckpt_path or model_path}; {COMMANDS}")
    run_session(session, sys.stdin, sys.stdout, sys.stderr, interactive, show_prompt)


def run_session(session: ChatSession, lines: TextIO, out: TextIO, err: TextIO, interactive: bool, show_prompt: bool) -> None:
    """The REPL loop, on any streams (tests drive it with StringIO, and through a pseudo-terminal)."""
    terminal = interactive and lines is sys.stdin and sys.stdin.isatty()
    stop = None
    if terminal:
        import readline  # noqa: F401  (input() then edits lines and keeps their history)

        if threading.current_thread() is threading.main_thread():
            stop = StopRequest()
            previous = signal.signal(signal.SIGINT, stop.handle)
    try:
        _repl(session, lines, out, err, interactive, terminal, show_prompt, stop)
    finally:
        if stop is not None:
            signal.signal(signal.SIGINT, previous)


def _repl(session: ChatSession, lines: TextIO, out: TextIO, err: TextIO, interactive: bool, terminal: bool,
          show_prompt: bool, stop: Optional[StopRequest]) -> None:
    notes = out if interactive else err  # confirmations: on the terminal, or to stderr when piped
    while True:
        try:
            text = _read_line(lines, out, interactive, terminal)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in a shell
            out.write("\n")
            continue
        if text is None or text.strip() == "/exit":
            if interactive:
                out.write("\n" if text is None else "")  # Ctrl-D leaves the cursor mid-line
            break
        command = text.strip()
        if command == "/help":
            notes.write(HELP + "\n")
            continue
        if command == "/reset":
            session.reset()
            notes.write("(conversation reset)\n")
            continue
        if command.startswith("/system"):
            session.reset(command.removeprefix("/system").strip() or None)
            notes.write(f"(system prompt set to {session.system_prompt!r}; conversation reset)\n")
            continue
        if command.startswith("/") and " " not in command:
            notes.write(f"(unknown command {command}; /help lists them)\n")
            continue
        if not command:
            continue
        if show_prompt:
            err.write(session.prompt_text(text) + "\n")
        try:
            if interactive:
                out.write("assistant> ")
                reply, stopped = session.reply(text, on_text=lambda piece: (out.write(piece), out.flush()), stop=stop)
                out.write("\n")
            else:
                reply, stopped = session.reply(text)
                out.write(reply.replace("\n", " ") + "\n")  # one reply per line, for scripts
                out.flush()
        except KeyboardInterrupt:
            out.write("\n(reply stopped; not kept in the conversation)\n")
            continue
        if not stopped:
            err.write(f"(reply cut at max_new_tokens={session.settings.max_new_tokens})\n")


def _read_line(lines: TextIO, out: TextIO, interactive: bool, terminal: bool) -> Optional[str]:
    """The next user line, or None at the end of input (Ctrl-D)."""
    if terminal:
        try:
            return input("you> ")
        except EOFError:
            return None
    if interactive:
        out.write("you> ")
        out.flush()
    line = lines.readline()
    return line.rstrip("\n") if line else None
