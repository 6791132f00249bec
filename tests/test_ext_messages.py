"""csrc's argument-check messages are single strings: TORCH_CHECK(cond, "literal") or
TORCH_CHECK(cond, message(...)), never c10::str's several arguments, which format through an
ostream inside the extension. On the H100 machine the default compiler builds its own copy of
libstdc++'s stream code into the extension, and formatting a number with it crashed the process
where adam_step's check failed (csrc/fastdcgan.h, fastdcgan::message)."""
import pathlib
import re

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"


def _top_level_args(text, start):
    """The comma-separated top-level arguments of the call whose '(' is at text[start]."""
    args, depth, cur, i = [], 0, "", start + 1
    while True:
        ch = text[i]
        if ch == '"':   # a string literal, with its escapes
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            cur += text[i:j + 1]
            i = j + 1
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return args + [cur.strip()]
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            i += 1
            continue
        cur += ch
        i += 1


def _checks():
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".cpp", ".h", ".cu"):
            text = path.read_text()
            for m in re.finditer(r"\bTORCH_CHECK\(", text):
                yield path.name, _top_level_args(text, m.end() - 1)


def test_the_parser_sees_the_checks():
    checks = list(_checks())
    assert len(checks) >= 10
    assert any(args[1].startswith("message(") for _, args in checks)


def test_every_torch_check_message_is_one_string():
    for name, args in _checks():
        assert len(args) == 2, (name, args)
        msg = args[1]
        literal = re.fullmatch(r'("(?:[^"\\]|\\.)*"\s*)+', msg)
        assert literal or msg.startswith("message("), (name, msg)
