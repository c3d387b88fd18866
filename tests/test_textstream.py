"""UTF-8 reassembly and stop-string cutting, independent of any model."""

from __future__ import annotations

import pytest

from shimmy.engine.textstream import TextAssembler


def feed_all(assembler: TextAssembler, chunks: list[bytes]) -> list[str]:
    out = [assembler.feed(chunk) for chunk in chunks]
    out.append(assembler.finish())
    return out


def test_multibyte_character_split_across_tokens_is_held_back() -> None:
    euro = "€".encode()
    pieces = feed_all(TextAssembler(), [b"a", euro[:1], euro[1:2], euro[2:], b"b"])
    assert pieces == ["a", "", "", "€", "b", ""]


def test_every_byte_split_of_mixed_text_reassembles_exactly() -> None:
    text = "héllo wörld — 日本語 🎉!"
    data = text.encode()
    for size in range(1, 6):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        pieces = feed_all(TextAssembler(), chunks)
        assert "".join(pieces) == text
        for piece in pieces:
            piece.encode("utf-8")  # never a lone surrogate or partial character


def test_invalid_bytes_become_replacement_characters() -> None:
    pieces = feed_all(TextAssembler(), [b"ok\xff", b"\xfe!"])
    assert "".join(pieces) == "ok\ufffd\ufffd!"


def test_incomplete_character_at_end_is_replaced_not_dropped() -> None:
    assert "".join(feed_all(TextAssembler(), [b"x", "€".encode()[:2]])) == "x\ufffd"


@pytest.mark.parametrize(
    ("chunks", "stop", "expected"),
    [
        ([b"hello STOP world"], ["STOP"], "hello "),
        ([b"hello ST", b"OP world"], ["STOP"], "hello "),
        ([b"hello S", b"T", b"O", b"P"], ["STOP"], "hello "),
        ([b"a<en", b"d>b"], ["<end>", "zz"], "a"),
        ([b"STx"], ["STOP"], "STx"),  # a false start is released at the end
        ([b"xab", b"cd"], ["bc", "abcd"], "x"),  # the stop that starts first wins
    ],
)
def test_stop_strings_cut_text_before_them(
    chunks: list[bytes], stop: list[str], expected: str
) -> None:
    assembler = TextAssembler(stop)
    assert "".join(feed_all(assembler, chunks)) == expected


def test_text_that_may_start_a_stop_string_is_not_released_early() -> None:
    assembler = TextAssembler(["STOP"])
    assert assembler.feed(b"hi ST") == "hi "
    assert assembler.feed(b"OP") == ""
    assert assembler.stopped


def test_nothing_is_released_after_a_stop() -> None:
    assembler = TextAssembler(["x"])
    assert assembler.feed(b"axb") == "a"
    assert assembler.feed(b"more") == ""
    assert assembler.finish() == ""
