"""Chat templates: Hugging Face-style GGUF templates, builtin formats, and hostile templates that
must end in a clean ``TemplateError`` without running anything or exhausting the machine."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tiny_gguf import BOS, EOS, write_tiny_gguf

from shimmy.chat import templates as templates_module
from shimmy.chat.templates import ChatTemplate
from shimmy.errors import InvalidRequest, TemplateError
from shimmy.models.entry import ModelEntry
from shimmy.models.gguf_info import read_gguf_info

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Mistral-like: roles must alternate (raise_exception), empty assistant turns are skipped
# (continue) and a turn saying STOP ends the conversation early (break).
ALTERNATING = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}
{%- else %}{% set system = '' %}{% set turns = messages %}{% endif %}
{%- for message in turns %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}
{%- endif %}
{%- if message['content'] == 'STOP' %}{% break %}{% endif %}
{%- if message['role'] == 'assistant' and not message['content'] %}{% continue %}{% endif %}
{%- if message['role'] == 'user' %}
{%- if loop.first %}{{ '[INST] ' + system + message['content'] + ' [/INST]' }}
{%- else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}
{%- else %}{{ message['content'] + eos_token }}{% endif %}
{%- endfor %}"""

TOOLS = """{%- if tools %}<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
{% endif %}
{%- for message in messages %}
{%- if message.tool_calls %}
{%- for call in message.tool_calls %}<call id="{{ call.id }}">{{ call.function | tojson }}</call>
{% endfor %}
{%- elif message.role == 'tool' -%}
<result id="{{ message.tool_call_id }}" name="{{ message.name }}">{{ message.content }}</result>
{% else %}{{ message.role }}: {{ message.content }}
{% endif %}
{%- endfor %}"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Météo <now> & 'later'",
        "parameters": {"type": "object", "properties": {"zeta": {}, "alpha": {}}},
    },
}


def entry(
    chat_template: str | None = None,
    architecture: str | None = "llama",
    bos_token: str | None = BOS,
    eos_token: str | None = EOS,
) -> ModelEntry:
    return ModelEntry(
        id="m",
        path=Path("m.gguf"),
        source="model_paths",
        architecture=architecture,
        chat_template=chat_template,
        bos_token=bos_token,
        eos_token=eos_token,
    )


def jinja(text: str, **limits: Any) -> ChatTemplate:
    return ChatTemplate.for_entry(entry(text), **limits)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]


# --- templates from GGUF files -----------------------------------------------------------------


def test_chatml_template_renders_the_conversation() -> None:
    template = jinja(CHATML)
    assert template.source == "gguf"
    assert "<|im_end|>" in template.stop_strings
    assert template.render(CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(CONVERSATION[:2], add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    )


def test_loop_controls_and_eos_token() -> None:
    template = jinja(ALTERNATING)
    messages = [
        *CONVERSATION,
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "STOP"},
        {"role": "assistant", "content": "never rendered"},
    ]
    # The leading BOS the template writes is dropped: the engine adds BOS when tokenizing.
    assert template.render(messages) == (
        f"[INST] Be brief.\n\nHi there [/INST]Hello!{EOS}[INST] What is 2+2? [/INST]"
    )


def test_raise_exception_becomes_a_template_error() -> None:
    template = jinja(ALTERNATING)
    with pytest.raises(TemplateError) as caught:
        template.render([{"role": "assistant", "content": "I speak first"}])
    assert "roles must alternate" in str(caught.value.details)
    assert caught.value.status == 400


def test_tojson_keeps_text_and_key_order_and_tool_fields_reach_the_template() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Zürich", "at": 9}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": "sunny"},
    ]
    rendered = jinja(TOOLS).render(messages, tools=[WEATHER_TOOL])
    assert rendered == (
        "<tools>\n"
        '{"type": "function", "function": {"name": "weather", "description": '
        '"Météo <now> & \'later\'", "parameters": {"type": "object", "properties": '
        '{"zeta": {}, "alpha": {}}}}}\n'
        "</tools>\n"
        "user: Weather?\n"
        '<call id="call_1">{"name": "weather", "arguments": {"city": "Zürich", "at": 9}}</call>\n'
        '<result id="call_1" name="weather">sunny</result>\n'
    )
    assert json.loads(rendered.splitlines()[1]) == WEATHER_TOOL


def test_tojson_arguments_follow_json_dumps() -> None:
    template = jinja("{{ tools[0] | tojson(indent=2, sort_keys=true) }}")
    rendered = template.render(user("x"), tools=[WEATHER_TOOL])
    assert rendered == json.dumps(WEATHER_TOOL, indent=2, sort_keys=True, ensure_ascii=False)


def test_missing_attributes_are_empty_but_unknown_names_fail() -> None:
    assert jinja("[{{ messages[0].name }}]").render(user("x")) == "[]"
    assert jinja("{% if tools is defined and not tools %}none{% endif %}").render(user("x")) == (
        "none"
    )
    with pytest.raises(TemplateError, match="'undefined_thing' is undefined"):
        jinja("{{ undefined_thing }}").render(user("x"))


def test_globals_generation_tag_and_markers() -> None:
    template = jinja(
        "{{ strftime_now('%Y') | length }}|{% generation %}kept{% endgeneration %}"
        "|{{ bos_token }}{{ eos_token }}<end_of_turn>"
    )
    assert template.render(user("x")) == f"4|kept|{BOS}{EOS}<end_of_turn>"
    assert template.stop_strings == ["<end_of_turn>"]


def test_override_wins_over_the_file_template() -> None:
    template = ChatTemplate.for_entry(entry(CHATML), override="{{ messages[-1].content }}!")
    assert template.source == "override"
    assert template.render(user("hey")) == "hey!"


def test_syntax_error_is_reported_at_render_with_its_line() -> None:
    template = jinja("{% for m in messages %}\n{{ m.content }\n{% endfor %}")  # no error yet
    for _ in range(2):  # the cached failure is reported the same way each time
        with pytest.raises(TemplateError, match="syntax error on line 2"):
            template.render(user("x"))


def test_runtime_error_names_the_template_line() -> None:
    with pytest.raises(TemplateError, match=r"template line 3\)$"):
        jinja("a\nb\n{{ messages[0].content.upper(1, 2, 3) }}").render(user("x"))


def test_template_is_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parses: list[str] = []
    original = templates_module.GuardedEnvironment._parse

    def counting_parse(self: Any, source: str, name: Any, filename: Any) -> Any:
        parses.append(source)
        return original(self, source, name, filename)

    monkeypatch.setattr(templates_module.GuardedEnvironment, "_parse", counting_parse)
    template = jinja(CHATML)
    for text in ("a", "b", "c"):
        assert template.render(user(text)).startswith(f"<|im_start|>user\n{text}")
    assert parses == [CHATML]


def test_concurrent_renders_keep_separate_budgets() -> None:
    # One request spins until its deadline while others render normally on other threads.
    template = jinja(
        "{% if messages[0].content == 'spin' %}"
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        "{% endif %}<{{ messages[0].content }}>",
        timeout=1.0,
    )

    def render(text: str) -> str:
        try:
            return template.render(user(text))
        except TemplateError as exc:
            return f"error: {exc.details}"

    texts = ["spin", *(f"m{i}" for i in range(40))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(render, texts))
    assert results[0].startswith("error: the chat template took longer than 1 s")
    assert results[1:] == [f"<m{i}>" for i in range(40)]


# --- builtin and plain formats -----------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["gemma", "gemma2", "gemma3"])
def test_gemma_builtin_folds_the_system_prompt_into_the_first_user_turn(
    architecture: str,
) -> None:
    template = ChatTemplate.for_entry(entry(None, architecture))
    assert template.source == f"builtin:{architecture}"
    assert template.stop_strings == ["<end_of_turn>"]
    assert template.render(CONVERSATION) == (
        "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_builtin_without_system_or_generation_prompt() -> None:
    template = ChatTemplate.for_entry(entry("   ", "gemma3"))  # a blank template counts as none
    assert template.source == "builtin:gemma3"
    rendered = template.render(CONVERSATION[1:3], add_generation_prompt=False)
    assert rendered == (
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    )
    assert BOS not in rendered


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
def test_chatml_builtin(architecture: str) -> None:
    template = ChatTemplate.for_entry(entry(None, architecture))
    assert template.source == f"builtin:{architecture}"
    assert template.stop_strings == ["<|im_end|>"]
    assert template.render(CONVERSATION[:2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_phi3_builtin() -> None:
    template = ChatTemplate.for_entry(entry(None, "phi3"))
    assert template.stop_strings == ["<|end|>"]
    assert template.render(CONVERSATION[:3]) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n"
        "<|assistant|>\nHello!<|end|>\n<|assistant|>\n"
    )


@pytest.mark.parametrize("architecture", ["llama", "mamba", None])
def test_plain_fallback(architecture: str | None) -> None:
    template = ChatTemplate.for_entry(entry(None, architecture))
    assert template.source == "plain"
    assert template.stop_strings == ["\nUser:"]
    assert template.render(CONVERSATION) == (
        "System: Be brief.\nUser: Hi there\nAssistant: Hello!\nUser: What is 2+2?\nAssistant:"
    )


# --- messages ----------------------------------------------------------------------------------


def test_content_parts_are_joined() -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
        }
    ]
    assert jinja("{{ messages[0].content }}").render(messages) == "first\nsecond"
    assert ChatTemplate.for_entry(entry(None)).render(messages) == (
        "User: first\nsecond\nAssistant:"
    )


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "only text parts",
        ),
        ([{"role": "wizard", "content": "hi"}], "role must be one of"),
        ([{"content": "hi"}], "role must be one of"),
        (["hi"], "must be an object"),
        ([{"role": "user", "content": 42}], "must be a string or a list"),
        ("hi", "must be a list"),
    ],
)
def test_malformed_messages_are_invalid_requests(messages: Any, complaint: str) -> None:
    with pytest.raises(InvalidRequest, match=complaint) as caught:
        jinja(CHATML).render(messages)
    assert caught.value.code == "invalid_request"


def test_templates_cannot_change_the_callers_messages() -> None:
    messages = user("keep me")
    with pytest.raises(TemplateError):
        jinja("{{ messages.pop() }}{% set m = messages[0] %}{{ m.update({'role': 'x'}) }}").render(
            messages
        )
    assert messages == user("keep me")


# --- hostile templates -------------------------------------------------------------------------

MARKER = "MARKER_PATH"

ESCAPES = {
    "mro_subclasses_os_system": (
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}"
        "{% if c.__name__ == 'catch_warnings' %}"
        "{{ c()._module.__builtins__['__import__']('os').system('touch MARKER_PATH') }}"
        "{% endif %}{% endfor %}"
    ),
    "cycler_globals": "{{ cycler.__init__.__globals__.os.system('touch MARKER_PATH') }}",
    "joiner_globals": "{{ joiner.__init__.__globals__['os'].popen('touch MARKER_PATH').read() }}",
    "namespace_builtins_open": (
        "{{ namespace.__init__.__globals__.__builtins__.open('MARKER_PATH', 'w').write('x') }}"
    ),
    "template_reference_context": (
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os"
        ".system('touch MARKER_PATH') }}"
    ),
    "lipsum_globals": "{{ lipsum.__globals__['os'].system('touch MARKER_PATH') }}",
    "our_own_global_function": (
        "{{ raise_exception.__globals__['__builtins__']['__import__']('os')"
        ".system('touch MARKER_PATH') }}"
    ),
    "flask_style_request": (
        "{{ request.application.__globals__.__builtins__.__import__('os')"
        ".popen('touch MARKER_PATH').read() }}"
    ),
    "config_class": "{{ config.__class__.__init__.__globals__['os'].system('touch MARKER_PATH') }}",
    "format_attribute_walk": (
        "{{ '{0.__class__.__mro__[1].__subclasses__}'.format('') }}"
        "{{ 'touch MARKER_PATH' if false }}"
    ),
    "format_map_walk": "{{ '{x.__class__}'.format_map({'x': messages}) }}",
    "type_mro_method": "{{ dict.mro()[1] }}",
    "dunder_via_getitem": "{{ messages['__class__'] }}{{ ''['__class__'] }}",
    "probe_in_condition": "{% if ''.__class__ %}leak{% endif %}",
    "str_translate_method": "{{ 'x'.translate({120: 'y' * 100}) }}",
    "mutating_messages": "{{ messages.append({'role': 'system', 'content': 'pwned'}) }}",
    "include_a_file": "{% include '/etc/passwd' %}",
    "import_a_module": "{% import 'os' as os %}{{ os.system('touch MARKER_PATH') }}",
    "print_config": "{{ config }}",
    "print_request": "{{ request }}",
}

# Each abuse, and what stops it.
EXHAUSTION = {
    "huge_string_repeat": ("{{ 'a' * 10**9 }}", "'*' would build"),
    "huge_list_repeat": ("{{ [0] * 10**9 }}", "'*' would build"),
    "huge_range_list": ("{{ range(10**9) | list }}", "range() of more than"),
    "huge_range_loop": ("{% for i in range(10**9) %}{% endfor %}", "range() of more than"),
    # Jinja reads a ** b ** c as (a ** b) ** c.
    "power_tower": ("{{ 9 ** (9 ** 9) }}", "number in the chat template grew too large"),
    "printf_width": ("{{ '%0999999999d' % 1 }}", "% format width"),
    "printf_star_width": ("{{ '%*d' % (999999999, 1) }}", "'*' widths"),
    "format_width": ("{{ '{:>999999999}'.format(1) }}", "format width"),
    "format_nested_width": ("{{ '{:>{}}'.format(1, '999999999') }}", "nested format fields"),
    "center_filter": ("{{ 'x' | center(999999999) }}", "'center' filter was given a number"),
    "native_method_size": ("{{ (5).to_bytes(10**8, 'big') }}", "to_bytes() was given a number"),
    "str_zfill": ("{{ 'x'.zfill(10**8) }}", "zfill() was given a number"),
    "namespace_doubling": (
        "{% set ns = namespace(s='ab') %}"
        "{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        "string built with '~' is larger",
    ),
    "plus_doubling": (
        "{% set ns = namespace(s='ab') %}"
        "{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
        "'+' would build",
    ),
    # Nested lists sharing one value: tiny in memory, enormous to compare or print.
    "shared_list_tree": (
        "{% set ns = namespace(l=[1]) %}"
        "{% for i in range(80) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l == ns.l }}",
        "literal is larger",
    ),
    "unrolled_shared_tuples": (
        "{% set a = (1,) %}" + "{% set a = (a, a) %}" * 70 + "{{ a == a }}",
        "literal is larger",
    ),
    "replace_method_blowup": (
        "{% set s = 'x' * 900000 %}{{ s.replace('x', s) | length }}",
        "str.replace() would build",
    ),
    "replace_filter_blowup": (
        "{% set s = 'x' * 900000 %}{{ s | replace('x', s) | length }}",
        "replace would build",
    ),
    "join_blowup": (
        "{% set s = 'x' * 300000 %}{{ [s, s, s] | join(s) | length }}",
        "join would build",
    ),
    "expandtabs_blowup": (
        "{{ ('\\t' * 1000).expandtabs(999999) | length }}",
        "str.expandtabs() would build",
    ),
    "batch_fill": ("{{ [1] | batch(999999999, 'x') | list }}", "'batch' filter was given"),
    "block_buffer_growth": (
        "{% set x %}{% for i in range(100000) %}{% for j in range(1000) %}"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa{% endfor %}{% endfor %}{% endset %}"
        "{{ x | length }}",
        "block of the chat template grew",
    ),
    "many_big_variables": (
        "{% set s = 'x' * 900000 %}"
        + "".join(f"{{% set v{i} = s ~ '{i}' %}}" for i in range(40))
        + "{{ v0 | length }}",
        "variables hold more than",
    ),
    "infinite_macro_recursion": (
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "recursed too deeply",
    ),
    "infinite_loop_recursion": (
        "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
        "recursed too deeply",
    ),
    "sum_of_lists": ("{{ [[1]] * 90000 | sum(start=[]) }}", "only adds numbers"),
    "huge_output": (
        "{% for i in range(100000) %}{{ 'y' * 900000 }}{% endfor %}",
        "output is longer than",
    ),
}


@pytest.mark.parametrize("source", ESCAPES.values(), ids=ESCAPES.keys())
def test_escape_attempts_fail_cleanly_and_run_nothing(source: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    template = jinja(source.replace(MARKER, str(marker)))
    with pytest.raises(TemplateError) as caught:
        template.render(user("hi"))
    assert not marker.exists()
    error = caught.value
    assert error.code == "template_error" and error.status == 400
    assert error.details and "Traceback" not in error.details
    assert error.__cause__ is None and error.__suppress_context__


@pytest.mark.parametrize(("source", "reason"), EXHAUSTION.values(), ids=EXHAUSTION.keys())
def test_exhaustion_attempts_are_stopped(source: str, reason: str) -> None:
    # The generous deadline shows that the size limits stop these, not the clock.
    with pytest.raises(TemplateError) as caught:
        jinja(source, timeout=60.0).render(user("hi"))
    assert reason in str(caught.value.details)


def test_a_long_loop_stops_at_the_deadline() -> None:
    spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match=r"took longer than 0\.05 s"):
        jinja(spin, timeout=0.05).render(user("hi"))


def test_comparisons_count_as_steps() -> None:
    # A loop whose body only compares still reaches the deadline (the steps are counted).
    spin = (
        "{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% if i == j %}{% endif %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="took longer"):
        jinja(spin, timeout=0.05).render(user("hi"))


def test_output_is_capped_at_max_chars() -> None:
    template = jinja("{% for m in messages %}{{ m.content }}{% endfor %}", max_chars=1000)
    assert template.render(user("x" * 1000)) == "x" * 1000
    with pytest.raises(TemplateError, match="longer than 1000 characters"):
        template.render(user("x" * 600) + user("y" * 600))


def test_builtin_output_is_capped_at_max_chars() -> None:
    template = ChatTemplate.for_entry(entry(None, "gemma3"), max_chars=1000)
    with pytest.raises(TemplateError, match="longer than 1000 characters"):
        template.render(user("x" * 1000))


def test_an_overlong_template_is_refused() -> None:
    source = "{# " + "x" * templates_module.MAX_TEMPLATE_CHARS + " #}"
    with pytest.raises(TemplateError, match="template is longer than"):
        jinja(source).render(user("hi"))


# --- a hostile template inside a real GGUF file ------------------------------------------------


def entry_from_file(path: Path) -> ModelEntry:
    info = read_gguf_info(path)
    return ModelEntry(
        id=path.stem,
        path=path,
        source="model_paths",
        architecture=info.architecture,
        chat_template=info.chat_template,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
    )


def test_hostile_template_in_a_gguf_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = ESCAPES["mro_subclasses_os_system"].replace(MARKER, str(marker))
    path = write_tiny_gguf(tmp_path / "evil.gguf", chat_template=payload)
    template = ChatTemplate.for_entry(entry_from_file(path))
    assert template.source == "gguf"
    with pytest.raises(TemplateError, match="unsafe"):
        template.render(user("hi"))
    assert not marker.exists()


def test_benign_template_in_a_gguf_file(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "chatml.gguf", chat_template="{{ bos_token }}" + CHATML)
    template = ChatTemplate.for_entry(entry_from_file(path))
    assert template.render(user("hi")) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
