"""The part of Go's text/template that a ``template`` sent to Ollama's ``/api/generate`` uses.

Ollama renders a request's ``template`` with Go templates. The overrides clients send are small
prompt formats: ``{{ .System }}``, ``{{ .Prompt }}`` and ``{{ .Response }}``, ``{{ if .X }}``
with ``{{ else }}`` / ``{{ else if .Y }}``, ``{{ end }}``, ``{{/* comments */}}`` and the
``{{-`` / ``-}}`` markers that trim the whitespace next to them. That is what this module runs.
Anything else (``range .Messages``, functions, pipelines) is refused with a 400 naming the
action, never rendered wrongly; such prompts can be formatted by the client and sent with
``raw: true``.

As in Ollama, the prompt ends where ``{{ .Response }}`` appears: the model writes the response
from there.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

from shimmy.errors import InvalidRequest

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_FIELD = re.compile(r"\.(System|Prompt|Response|Suffix)")
MAX_TEMPLATE_CHARS = 64 * 1024
_PARAM = "template"


@dataclass
class _Text:
    text: str


@dataclass
class _Field:
    name: str


@dataclass
class _If:
    # (condition field, body) pairs; a None condition is the final ``else``.
    branches: list[tuple[str | None, list[_Node]]] = field(default_factory=list)


_Node = _Text | _Field | _If


def _unsupported(action: str) -> InvalidRequest:
    shown = action if len(action) <= 60 else action[:57] + "..."
    return InvalidRequest(
        f"the template uses '{{{{ {shown} }}}}', which shimmy cannot run (it runs .System, "
        ".Prompt, .Response, .Suffix, if/else/end and comments); format the prompt yourself "
        "and send it with raw: true",
        param=_PARAM,
    )


def _condition(action: str, keyword: str) -> str:
    match = _FIELD.fullmatch(action[len(keyword) :].strip())
    if match is None:
        raise _unsupported(action)
    return match[1]


def _tokens(template: str) -> list[str | tuple[str]]:
    """Text pieces (whitespace already trimmed where a marker asks) and actions (1-tuples)."""
    pieces: list[str | tuple[str]] = []
    position = 0
    trim_next = False
    for match in _ACTION.finditer(template):
        text = template[position : match.start()]
        if trim_next:
            text = text.lstrip()
        if match[1]:
            text = text.rstrip()
        pieces.append(text)
        pieces.append((match[2].strip(),))
        trim_next = bool(match[3])
        position = match.end()
    rest = template[position:]
    pieces.append(rest.lstrip() if trim_next else rest)
    if any(isinstance(piece, str) and "{{" in piece for piece in pieces):
        raise InvalidRequest("the template has an unclosed '{{'", param=_PARAM)
    return pieces


def parse(template: str) -> list[_Node]:
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidRequest(f"the template is over {MAX_TEMPLATE_CHARS} characters", param=_PARAM)
    root: list[_Node] = []
    # Open blocks: the node list being filled and, for an ``if``, the node itself.
    stack: list[tuple[list[_Node], _If | None]] = [(root, None)]
    for piece in _tokens(template):
        body, block = stack[-1]
        if isinstance(piece, str):
            if piece:
                body.append(_Text(piece))
            continue
        action = piece[0]
        if action.startswith("/*") and action.endswith("*/"):
            continue
        if (match := _FIELD.fullmatch(action)) is not None:
            body.append(_Field(match[1]))
        elif action.startswith("if ") or action == "if":
            node = _If([(_condition(action, "if"), [])])
            body.append(node)
            stack.append((node.branches[0][1], node))
        elif action == "else" or action.startswith("else if"):
            if block is None or block.branches[-1][0] is None:
                raise InvalidRequest("the template has an 'else' outside an 'if'", param=_PARAM)
            condition = None if action == "else" else _condition(action, "else if")
            block.branches.append((condition, []))
            stack[-1] = (block.branches[-1][1], block)
        elif action == "end":
            if block is None:
                raise InvalidRequest("the template has an 'end' without an 'if'", param=_PARAM)
            stack.pop()
        else:
            raise _unsupported(action)
    if len(stack) > 1:
        raise InvalidRequest("the template has an 'if' without an 'end'", param=_PARAM)
    return root


class _ResponseReached(Exception):
    """Rendering stops at ``.Response``: the model continues from there."""


def _render(nodes: list[_Node], values: dict[str, str], out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Field):
            if node.name == "Response":
                raise _ResponseReached
            out.append(values.get(node.name, ""))
        else:
            for condition, body in node.branches:
                if condition is None or values.get(condition):
                    _render(body, values, out)
                    break


def render(template: str, *, system: str = "", prompt: str = "", suffix: str = "") -> str:
    """The prompt ``template`` makes of these values, up to ``{{ .Response }}``."""
    nodes = parse(template)
    out: list[str] = []
    values = {"System": system, "Prompt": prompt, "Suffix": suffix}
    with contextlib.suppress(_ResponseReached):
        _render(nodes, values, out)
    return "".join(out)
