"""An environment's reply as ids with the template's own wrappers; multi-turn completions (SFT traces) with a loss mask."""

from __future__ import annotations

import pytest

from tokalign import models
from tokalign.data.tool_arith import trace
from tokalign.environments.turns import conversation_tokens, reply_ids, reply_text
from tokalign.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("")  # the bundled model's ChatML template


def test_reply_text_is_the_templates_text_between_turns(tok):
    tool = {"role": "tool", "name": "calculator", "content": "42"}
    assert reply_text(tok, [tool], None, "<|im_end|>") == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    # a turn not ended by the template's end-of-turn token gets it from the reply
    assert reply_text(tok, [tool]) == "<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


def test_appended_ids_equal_the_rendered_conversation(tok):
    """Prompt + model ids + reply ids decode to exactly what the chat template renders for the whole conversation."""
    prompt = [{"role": "user", "content": "12*34="}]
    call = trace(12, 34)
    ids = tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    ids += tok(call[0]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids += reply_ids(tok, [call[1]], None, "<|im_end|>")
    whole = tok.apply_chat_template(prompt + call[:2], add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == whole


def test_conversation_tokens_mask_only_assistant_turns(tok):
    ids, mask = conversation_tokens(tok, trace(12, 34))
    model = [t for t, m in zip(ids, mask) if m]
    env = [t for t, m in zip(ids, mask) if not m]
    assert tok.decode(env) == "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(model) == trace(12, 34)[0]["content"] + "<|im_end|>408<|im_end|>"
    # the limiting case: one assistant turn is the plain completion, all mask 1
    one, mask1 = conversation_tokens(tok, [{"role": "assistant", "content": "408"}])
    assert mask1 == [1] * len(one) and tok.decode(one) == "408<|im_end|>"
    with pytest.raises(UserError, match="start with an assistant"):
        conversation_tokens(tok, [{"role": "tool", "content": "1"}, {"role": "assistant", "content": "1"}])
    with pytest.raises(UserError, match="end with an assistant"):
        conversation_tokens(tok, trace(1, 2)[:2])
