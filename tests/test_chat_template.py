from __future__ import annotations

import pytest

from appliance.engines import prompt as chat_template

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_renders_with_generation_prompt() -> None:
    text = chat_template.render(CHATML, [{"role": "user", "content": "hi"}], bos="", eos="")
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tools_described_when_the_template_has_no_tool_support() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    text = chat_template.render(CHATML, [{"role": "user", "content": "hi"}], bos="", eos="",
                                tools=tools)
    assert text.startswith("<|im_start|>system\nYou can call these functions")
    assert '"name": "f"' in text


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{{ raise_exception('nope') }}",
    "{% for x in %}",
])
def test_sandbox_refuses(evil: str) -> None:
    with pytest.raises(chat_template.TemplateFailure):
        chat_template.render(evil, [{"role": "user", "content": "hi"}], bos="", eos="")
