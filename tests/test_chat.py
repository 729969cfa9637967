"""The chat REPL's commands and streaming, driven in-process with text streams."""

import io

from sft_lightning.chat import ChatSession, load_for_chat, run_session
from sft_lightning.generation import GenerationSettings
from tests.conftest import TINY_QWEN


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
    assert session.messages[2]["content"] in transcript  # streamed as generated
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello" in err.getvalue()  # --show_prompt
    assert "never read" not in err.getvalue()  # /exit stops reading
