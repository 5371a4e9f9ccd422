"""chassis.ai.templates: sandboxed Jinja2 over a step's data; missing keys are named."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from chassis.ai import PromptTemplateError, render

DATA: dict[str, Any] = {
    "input": {"topic": "Celery", "tags": ["queues", "sagas"]},
    "research": {"web_research": {"findings": "Chords fan in."}},
    "human_feedback": {"ok": True},
}


def test_renders_input_earlier_outputs_and_feedback() -> None:
    template = ("{{ input.topic }}: {{ research.web_research.findings }} "
                "{% for t in input.tags %}#{{ t }} {% endfor %}ok={{ human_feedback.ok }}")
    assert render(template, DATA) == "Celery: Chords fan in. #queues #sagas ok=True"


def test_default_filter_covers_an_optional_key() -> None:
    assert render("for {{ input.audience | default('everyone') }}", DATA) == "for everyone"
    assert render("{{ input.x | default('none') }}", {"input": None}) == "none"


@pytest.mark.parametrize(("template", "key", "said"), [
    ("About {{ input.topc }}", "topc", "no key 'topc' in a map with keys: tags, topic"),
    ("{{ reserch.web_research }}", "reserch", "'reserch' is undefined"),
    ("{{ research.web_research.summary }}", "summary", "keys: findings"),
    ("{{ input.topic.words }}", "words", "no key 'words' in str value 'Celery'"),
    ("{% if input.missing %}x{% endif %}", "missing", "no key 'missing'"),
])
def test_a_missing_key_is_an_error_naming_it(template: str, key: str, said: str) -> None:
    with pytest.raises(PromptTemplateError) as info:
        render(template, DATA)
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"prompt template: missing key '{key}'")
    assert said in message
    assert "the step's data has: human_feedback, input, research" in message


def test_the_error_says_which_template() -> None:
    with pytest.raises(PromptTemplateError, match="^system template: missing key 'x'"):
        render("{{ x }}", {}, what="system")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ input.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ input.topic.format.__globals__ }}",
    "{{ (1).__class__.__base__.__subclasses__() }}",
])
def test_the_sandbox_keeps_python_internals_out_of_reach(template: str) -> None:
    with pytest.raises(PromptTemplateError, match="^prompt template is not allowed: .*unsafe"):
        render(template, DATA)


def test_the_sandbox_caps_huge_ranges() -> None:
    with pytest.raises(PromptTemplateError, match="MAX_RANGE"):
        render("{{ range(10**9) | list | length }}", DATA)


def test_a_syntax_error_names_the_line() -> None:
    with pytest.raises(PromptTemplateError,
                       match="^prompt template has a syntax error on line 2: "):
        render("fine\n{{ input.topic", DATA)


def test_a_template_must_be_a_string() -> None:
    with pytest.raises(PromptTemplateError, match="prompt must be a string .*got dict"):
        render({"a": 1}, DATA)  # type: ignore[arg-type]


def test_text_without_markup_is_kept_as_is() -> None:
    assert render("Just text.\n", {}) == "Just text.\n"


@pytest.mark.parametrize("template, message", [
    ("{{ 9 ** (9 ** 8) }}", "9 ** 43046721 is too large to compute"),
    ("{{ 'x' * 10 ** 9 }}", "repeating a str 1000000000 times"),
    ("{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}",
     "makes more than 1048576 characters"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}"
     "{% endfor %}{{ ns.x|length }}", "needs more memory than a template may use"),
    ("{{ 'x'|center(2000000000) }}", "needs more memory than a template may use"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "took longer than 2 s"),
])
def test_a_template_cannot_hold_the_worker(template: str, message: str) -> None:
    began = time.monotonic()
    with pytest.raises(PromptTemplateError, match=re.escape(message)):
        render(template, {"input": {}})
    assert time.monotonic() - began < 10
    assert render("{{ input.ok }}", {"input": {"ok": "still fine"}}) == "still fine"


def test_the_limits_are_the_callers() -> None:
    with pytest.raises(PromptTemplateError, match="more than 10 characters"):
        render("{{ 'x' * 11 }}", {}, max_bytes=10)
    with pytest.raises(PromptTemplateError, match="longer than 0.2 s"):
        render("{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
               {}, seconds=0.2)
