"""The chat REPL's commands and streaming, driven in-process with text streams."""

import io
import sys

import pytest

from sft_lightning.chat import ChatSession, load_for_chat, run_session
from sft_lightning.generation import GenerationSettings
from tests.conftest import ROOT, TINY_QWEN


def test_repl_commands_history_and_streaming():
    model, tokenizer = load_for_chat(TINY_QWEN, None)
    session = ChatSession(model, tokenizer, GenerationSettings(max_new_tokens=4))
    out, err = io.StringIO(), io.StringIO()
    lines = io.StringIO("hi\n/system Be brief.\nhello\n\n/reset\nbye\n/exit\nnever read\n")
    run_session(session, lines, out, err, interactive=True, show_prompt=True)
    # /system set the prompt and reset; /reset kept the system prompt and dropped the exchange before it.
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[0]["content"] == "Be brief." and session.messages[1]["content"] == "bye"
    transcript = out.getvalue()
    assert transcript.count("you> ") == 7 and transcript.count("assistant> ") == 3  # the blank line asks again
    reply = session.messages[2]["content"]
    assert reply and reply in transcript  # a reply (4 tokens of the tiny model), streamed as generated
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello" in err.getvalue()  # --show_prompt
    assert "never read" not in err.getvalue()  # /exit stops reading


def test_repl_on_a_terminal_edits_lines_keeps_history_and_survives_ctrl_c():
    """The real command on a pseudo-terminal: readline editing and history, /help, Ctrl-C during a reply, Ctrl-D."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "sft_lightning.cli", "chat", f"--model_path={TINY_QWEN}",
                                           "--max_new_tokens=1500", "--show_prompt=true"],
                          cwd=str(ROOT), encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect_exact("you> ")
    child.send("/help\r")
    child.expect_exact("Ctrl-C stops a reply")
    child.expect_exact("you> ")
    child.send("helo\x1b[Dl\r")  # "helo", left arrow, "l": the line sent is "hello"
    child.expect_exact("<|im_start|>user\r\nhello<|im_end|>")
    child.expect_exact("assistant> ")
    child.sendintr()  # Ctrl-C while the reply is being written
    child.expect_exact("(reply stopped; not kept in the conversation)")
    child.expect_exact("you> ")
    child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, still running
    child.expect_exact("you> ")
    child.send("\x1b[A\x1b[A\r")  # up twice: back past "hello" to "/help"
    child.expect_exact("Ctrl-C stops a reply")
    child.expect_exact("you> ")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_temperature_zero_is_greedy_in_chat_and_predict_alike():
    # One knob for chat's --temperature and predict's --model.temperature: 0 never passes sampling settings on.
    assert GenerationSettings(7).kwargs() == {"max_new_tokens": 7, "do_sample": False}
    assert GenerationSettings(7, temperature=0.0, top_p=0.5).kwargs() == {"max_new_tokens": 7, "do_sample": False}
    assert GenerationSettings(7, temperature=0.7, top_p=0.9).kwargs() == {
        "max_new_tokens": 7, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
