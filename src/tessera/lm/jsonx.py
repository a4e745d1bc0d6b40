"""Robust JSON from model output: extraction, repair, lenient field recovery, and retries.

Language models, small ones above all, wrap JSON in prose or code fences, use smart
quotes, leave trailing commas, stop mid-object or nest a key where it does not
belong.  :func:`parse_json_reply` recovers what it can, in this order, and says
which way it got there (recorded in synthesis stats):

1. ``"json"``: the first well-formed JSON object in the text (``json.JSONDecoder.raw_decode``
   tried at each ``{``), after stripping code fences;
2. ``"repaired"``: the same after light repair: smart quotes -> ASCII quotes, trailing
   commas removed, an unterminated string and unclosed brackets closed at the end;
3. ``"fields"``: each wanted key read on its own (``"key": "string"`` or ``"key": [list]``),
   for output whose structure is broken but whose fields are intact.

:func:`generate_json` asks a backend for JSON for many conversations at once: the
first round is greedy, later rounds sample (temperature 0.7, new seed) for the
conversations whose reply did not validate, up to ``retries`` attempts in all (3 by
default); conversations that never validate come back with their error and their
raw replies, so the caller records the failure instead of crashing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_FENCE = re.compile(r"```(?:json|JSON)?\s*")
_SMART = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'"})
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _first_object(text: str) -> dict | None:
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def close_json(text: str) -> str:
    """Close an unterminated string and any open ``{``/``[`` at the end of ``text`` (from its first ``{``)."""
    start = text.find("{")
    if start < 0:
        return text
    s = text[start:]
    stack: list[str] = []
    in_str = esc = False
    for ch in s:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if stack and stack[-1] == ch:
                stack.pop()
            else:  # a stray closer: the object's structure ends here
                break
    tail = s.rstrip()
    if in_str:
        tail += '"'
    tail = re.sub(r",\s*$", "", tail)
    if tail.endswith(":"):
        tail += ' ""'
    return tail + "".join(reversed(stack))


def repair_json(text: str) -> str:
    text = _FENCE.sub("", text).translate(_SMART)
    return _TRAILING_COMMA.sub(r"\1", text)


def extract_fields(text: str, keys: Sequence[str]) -> dict:
    """Each of ``keys`` read on its own: ``"key": "string"`` (an unterminated last string runs to the end)
    or ``"key": [..]`` (strings inside the list)."""
    text = repair_json(text)
    out: dict = {}
    for key in keys:
        m = re.search(r'"%s"\s*:\s*' % re.escape(key), text)
        if not m:
            continue
        rest = text[m.end():]
        if rest.startswith('"'):
            s = re.match(r'"((?:[^"\\]|\\.)*)("?)', rest, re.S)
            value = s.group(1)
            try:
                value = json.loads(f'"{value}"')
            except ValueError:
                pass
            out[key] = value
        elif rest.startswith("["):
            end = rest.find("]")
            body = rest[1:end if end >= 0 else len(rest)]
            out[key] = re.findall(r'"((?:[^"\\]|\\.)*)"', body)
    return out


def parse_json_reply(text: str, keys: Sequence[str] = ()) -> tuple[dict | None, str]:
    """``(object, method)`` with method ``json | repaired | fields``, or ``(None, "none")``.

    With ``keys``, a parsed object that lacks one of them falls through to the next
    method (a small model often closes the object early and writes the rest outside it).
    """
    def complete(obj):
        return obj is not None and all(k in obj for k in keys)

    cleaned = _FENCE.sub("", text)
    obj = _first_object(cleaned)
    if complete(obj):
        return obj, "json"
    fixed = repair_json(cleaned)
    for cand in (fixed, close_json(fixed)):
        obj = _first_object(cand)
        if complete(obj):
            return obj, "repaired"
    if keys:
        obj = extract_fields(cleaned, keys)
        if complete(obj):
            return obj, "fields"
    return None, "none"


def is_looping(text: str, repeats: int = 3, max_period: int = 24) -> bool:
    """True when ``text`` ends with the same run of 1..``max_period`` words repeated ``repeats`` times
    (a degenerate loop: small models under greedy decoding fall into them); punctuation is ignored."""
    words = [w.strip("\"',.;:[]{}()") for w in text.split()]
    words = [w for w in words if w]
    for p in range(1, max_period + 1):
        if len(words) < p * repeats:
            break
        tail = words[-p:]
        if all(words[-(k + 1) * p: len(words) - k * p] == tail for k in range(1, repeats)):
            return True
    return False


def json_complete(keys: Sequence[str]) -> Callable[[str], bool]:
    """A ``stop_when`` test: true once the last of ``keys`` has a closed value (a finished string or list)
    and the text parses with all ``keys``, so generation stops right after the last field; also true when
    the reply has fallen into a loop (:func:`is_looping`), which ends a hopeless reply early."""
    last = keys[-1] if keys else None
    closed = re.compile(r'"%s"\s*:\s*("(?:[^"\\]|\\.)*"|\[[^\]]*\])' % re.escape(last)) if last else None

    def done(text: str) -> bool:
        if is_looping(text):  # give up on this reply early; it fails to parse and is retried
            return True
        if closed is None or not closed.search(repair_json(text)):
            return False
        return parse_json_reply(text, keys)[0] is not None

    return done


@dataclass
class JSONResult:
    """The outcome for one conversation of :func:`generate_json`."""

    value: dict | None
    method: str = "none"  # json | repaired | fields | none
    attempts: int = 0
    error: str | None = None
    raw: list[str] = field(default_factory=list)
    new_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.value is not None


def generate_json(backend, conversations: Sequence[list[dict]], keys: Sequence[str] = (),
                  validate: Callable[[dict], str | None] | None = None, retries: int = 3, max_new_tokens: int = 256,
                  prefix: str = "", seed: int = 0, temperature: float = 0.0, retry_temperature: float = 0.7,
                  stop_early: bool = True) -> list[JSONResult]:
    """JSON objects with ``keys`` from ``backend`` for every conversation, retried up to ``retries`` attempts.

    ``validate(obj)`` returns ``None`` when the object is acceptable, else the reason
    (e.g. "query is too short"), which counts as a failed attempt.
    """
    results = [JSONResult(None) for _ in conversations]
    todo = list(range(len(conversations)))
    stop = json_complete(keys) if stop_early and keys else None
    for attempt in range(max(1, int(retries))):
        if not todo:
            break
        temp = temperature if attempt == 0 else retry_temperature
        gens = backend.chat([conversations[i] for i in todo], max_new_tokens=max_new_tokens, temperature=temp,
                            seed=seed + 1000 * attempt, prefix=prefix, stop_when=stop)
        still = []
        for i, g in zip(todo, gens):
            r = results[i]
            r.attempts += 1
            r.new_tokens += g.new_tokens
            r.raw.append(g.text)
            if g.error:
                r.error = g.error
                still.append(i)
                continue
            obj, method = parse_json_reply(g.text, keys)
            if obj is None:
                r.error = "no JSON object with " + ", ".join(keys) if keys else "no JSON object"
                still.append(i)
                continue
            why = validate(obj) if validate is not None else None
            if why:
                r.error = why
                still.append(i)
                continue
            r.value, r.method, r.error = obj, method, None
        todo = still
    return results
