"""JSON Lines files, read and written one way everywhere: index files (strict, errors name file and line), logs
(tolerant of a torn last line) and the writers of the converters and the demo data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


def read_jsonl(path: str | Path, skip_bad_lines: bool = False) -> list[dict]:
    """All objects of a JSONL file, blank lines skipped. Strict by default: a missing file, non-UTF-8 text, a line
    that is not JSON or not an object raises (FileNotFoundError / ValueError naming file and line);
    ``skip_bad_lines=True`` drops such lines instead (logs that a crash may have cut)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file '{path}' does not exist")
    items = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                item = json.loads(line)
                if not isinstance(item, dict):
                    raise ValueError(f"index file '{path}' line {number}: expected a JSON object, got {item!r}")
            except UnicodeDecodeError as err:
                if skip_bad_lines:
                    continue
                raise ValueError(f"index file '{path}' line {number}: not UTF-8 text ({err})") from err
            except (json.JSONDecodeError, RecursionError) as err:
                if skip_bad_lines:
                    continue
                raise ValueError(f"index file '{path}' line {number}: not valid JSON ({err})") from err
            except ValueError:
                if skip_bad_lines:
                    continue
                raise
            items.append(item)
    return items


def write_jsonl(path: str | Path, items: Iterable[dict]) -> int:
    """Write ``items`` one JSON object per line (parent folders created); returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
            n += 1
    return n
