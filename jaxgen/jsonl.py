"""The command's dataset job: requests from a JSON-lines file, results appended to another as
each finishes, so that a rerun with the same output resumes where a killed run stopped.

An input line is one JSON object: ``"id"`` (a string or an int, unique), one of ``"prompt"``
(text), ``"messages"`` (chat messages) or ``"input_ids"``, and optional settings of its own
(`SETTINGS`, with their types). An output line: the id, the generated ``text`` and ``tokens``, their
``logprobs``, ``finish_reason``, the prompt's token count, timings and, with beams, the
``sequence_score``. A line is written whole
and flushed at once; a partial last line (a kill mid-write) is cut off on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SETTINGS = {"max_new_tokens": int, "temperature": float, "top_p": float, "min_p": float, "repetition_penalty": float,
            "length_penalty": float, "seed": int}
SOURCES = ("prompt", "messages", "input_ids")


def read_requests(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """Every request of ``path`` and its line number; ValueError ``path:line: what is wrong``."""
    requests, lines, seen = [], [], {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --input {path}: {e}") from None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
        _check(obj, where)
        if obj["id"] in seen:
            raise ValueError(f"{where}: id {obj['id']!r} is also the id of line {seen[obj['id']]}")
        seen[obj["id"]] = number
        requests.append(obj)
        lines.append(number)
    return requests, lines


def _check(obj, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
        raise ValueError(f"{where}: needs an \"id\" (a string or an integer)")
    sources = [k for k in SOURCES if k in obj]
    if len(sources) != 1:
        raise ValueError(f"{where}: needs exactly one of {', '.join(SOURCES)}")
    unknown = sorted(set(obj) - {"id", *SOURCES, *SETTINGS})
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; a request has id, one of {', '.join(SOURCES)}, "
                         f"and optionally {', '.join(SETTINGS)}")
    for name, kind in SETTINGS.items():
        value = obj.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ValueError(f"{where}: {name!r} must be {'a number' if kind is float else 'an integer'}, "
                             f"got {json.dumps(value)}")
    if "prompt" in obj and not (isinstance(obj["prompt"], str) and obj["prompt"].strip()):
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
    if "messages" in obj and not (isinstance(obj["messages"], list) and obj["messages"] and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in obj["messages"])):
        raise ValueError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., \"content\": ...}}")
    if "input_ids" in obj and not (isinstance(obj["input_ids"], list) and obj["input_ids"] and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in obj["input_ids"])):
        raise ValueError(f"{where}: \"input_ids\" must be a non-empty list of token ids (integers >= 0)")


class Results:
    """The output file: the ids already in it, and `write` for a finished request. Every line
    already there must be a result line (else ValueError, the file untouched); a partial last
    line that starts as one (a kill mid-write) is cut off."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.done: set = set()
        try:
            if self.path.exists():
                data = self.path.read_bytes()
                whole = data[:data.rfind(b"\n") + 1]
                lines = whole.split(b"\n")[:-1]  # (split on bytes: text may hold U+2028)
                for number, line in enumerate(lines, 1):
                    try:
                        record = json.loads(line)
                        if not ({"id", "tokens", "finish_reason"} <= set(record)):
                            raise TypeError
                    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
                        raise ValueError(f"{self.path}:{number}: not a result line of jaxgen; give another --output")
                    self.done.add(record["id"])
                if len(whole) < len(data):
                    if not data[len(whole):].startswith(b'{"id": '):
                        raise ValueError(f"{self.path}:{len(lines) + 1}: not a result line of jaxgen; give another "
                                         "--output")
                    with open(self.path, "r+b") as f:  # a line cut short by a kill: drop it
                        f.truncate(len(whole))
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot write --output {self.path}: {e}") from None

    def write(self, completion) -> None:
        record = {"id": completion.id, "text": completion.text, "tokens": completion.tokens,
                  "logprobs": [round(x, 6) for x in completion.logprobs], "finish_reason": completion.finish_reason,
                  "prompt_tokens": len(completion.prompt), "queued_s": round(completion.queued_s, 3),
                  "decode_s": round(completion.decode_s, 3)}
        if completion.sequence_score is not None:  # beam search's
            record["sequence_score"] = round(completion.sequence_score, 6)
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
