"""Input checks shared by every command: the file-kind check and the integer-option bound."""

from __future__ import annotations

import argparse
import os
import signal
import socket
from pathlib import Path

import pytest

from achilles.cli import build_parser
from achilles.config import INT_RANGE, parse_int, parse_numbers
from achilles.errors import AchillesError
from achilles.results.inputs import input_file_problem, read_text_input


@pytest.fixture
def alarm():  # noqa: ANN201
    """Fail instead of hanging if a check opens a FIFO (an open waits for a writer)."""
    def timeout(signum, frame):  # noqa: ANN001, ANN202
        raise TimeoutError("a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_every_kind_of_input_path_is_named(tmp_path: Path, alarm) -> None:  # noqa: ANN001
    text = tmp_path / "t.txt"
    text.write_text("hello", encoding="utf-8")
    assert input_file_problem(text, "--text-file") is None
    assert read_text_input(text, "--text-file") == "hello"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "to-pipe").symlink_to(fifo)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        expected = {
            tmp_path / "missing": "text file not found: {} (check --text-file)",
            tmp_path / "dangling": "text file not found: {} (check --text-file)",
            tmp_path: "{} is a folder, not a text file (check --text-file)",
            fifo: "{} is a named pipe (FIFO), not a regular text file (check --text-file)",
            tmp_path / "to-pipe": "{} is a named pipe (FIFO), not a regular text file",
            tmp_path / "sock": "{} is a socket, not a regular text file",
            Path("/dev/null"): "{} is a device, not a regular text file",
        }
        for path, message in expected.items():
            problem = input_file_problem(path, "--text-file", "text file")
            assert problem is not None and problem.startswith(message.format(path)), problem
            with pytest.raises(AchillesError) as e:
                read_text_input(path, "--text-file")
            assert str(e.value) == problem
    finally:
        sock.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_input_is_named(tmp_path: Path) -> None:
    p = tmp_path / "secret.txt"
    p.write_text("x")
    p.chmod(0)
    assert input_file_problem(p, "--data") == f"cannot read {p}: permission denied (check --data)"


def test_non_utf8_text_names_the_byte(tmp_path: Path) -> None:
    p = tmp_path / "latin1.txt"
    p.write_bytes("café".encode("latin-1"))
    with pytest.raises(AchillesError, match=r"not UTF-8 text \(check --calib-file\): byte 3"):
        read_text_input(p, "--calib-file")


def test_integer_options_are_64_bit() -> None:
    lo, hi = INT_RANGE
    assert (lo, hi) == (-(2**63), 2**63 - 1)
    assert parse_int(str(hi)) == hi and parse_int(str(lo)) == lo and parse_int("-5") == -5
    for bad, message in ((str(hi + 1), "beyond the 64-bit"), (str(lo - 1), "beyond the 64-bit"),
                         ("1e3", "invalid int value"), ("", "invalid int value")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_int(bad)
    assert parse_numbers("1,2", "--x") == (1, 2)
    with pytest.raises(AchillesError, match="--x: 9223372036854775808 is beyond"):
        parse_numbers(f"1,{hi + 1}", "--x")


def test_no_option_parses_unbounded_integers() -> None:
    """Every integer option of every command goes through parse_int (none is plain int, which
    lets 10**30 through to torch)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    plain, bounded = [], 0
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.type is int:
                plain.append(f"{name} {action.option_strings}")
            bounded += action.type is parse_int
    assert not plain, plain
    assert bounded > 40  # the dataclass fields and the commands' own options
