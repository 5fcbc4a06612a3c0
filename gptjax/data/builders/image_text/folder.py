"""A user's image folder read into entries: the captions file, the image files, the splits.

Layout: images anywhere below the folder (PNG, JPEG, anything Pillow reads; names relative
to the folder, ``/``-separated) plus ONE captions file at its top:

- ``captions.jsonl``: one JSON object per line, ``{"file": "a.png", "captions": ["..", ".."]}``
  (or ``"caption": ".."``), optional ``"qa": [{"question": "..", "answer": ".."}]`` and
  optional ``"split": "train" | "validation" | "test"``. Blank lines are ignored.
- ``captions.csv``: a header with columns ``file,caption`` and optionally ``split``; several
  rows for one file give it several captions.

Problems (each a ``Problem`` naming the file or line): a bad JSON line or row, a caption
line for a file that is not there, the same file twice in a ``.jsonl``, an image in the
folder that no line captions. Strict mode raises the first as a ``ValueError``; with
``skip_bad`` the item is left out and recorded (a duplicate keeps its first line).

Splits: a file's own ``split`` if given, else by ``sha256(file name)`` as a fraction of
2**64 against the cumulative fractions (train, validation, test) — deterministic, and a
file keeps its split when others are added. See ``assign_splits`` for empty splits.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from typing import Optional, Sequence

CAPTION_FILES = ("captions.jsonl", "captions.csv")
SPLITS = ("train", "validation", "test")
JSON_KEYS = ("file", "caption", "captions", "qa", "split")
CSV_COLUMNS = ("file", "caption", "split")
# Files found in the folder that count as images (and so need a caption). A file the
# captions file names is decoded whatever its extension.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".bmp", ".webp",
                    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".avif")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One image: its file (relative to the folder), captions, QA pairs and given split."""
  file: str
  captions: tuple[str, ...]
  qa: tuple[tuple[str, str], ...] = ()
  split: Optional[str] = None  # None: assigned by the hash of ``file``


@dataclasses.dataclass(frozen=True)
class Problem:
  item: str  # "a.png" or "captions.jsonl line 3"
  problem: str

  def as_dict(self) -> dict:
    return {"item": self.item, "problem": self.problem}


class Problems:
  """Collects problems; raises the first one unless ``skip_bad``."""

  def __init__(self, folder: str, skip_bad: bool):
    self.folder, self.skip_bad, self.items = folder, skip_bad, []

  def add(self, item: str, problem: str) -> None:
    if not self.skip_bad:
      raise ValueError(f"image_text folder {self.folder!r}: {item}: {problem} "
                       "(fix it, or pass skip_bad=True to leave such items out)")
    self.items.append(Problem(item, problem))


def _norm(name) -> Optional[str]:
  """A caption line's file name as a clean relative path, or None if it is not one."""
  if not isinstance(name, str) or not name.strip():
    return None
  p = os.path.normpath(name.strip().replace("\\", "/")).replace(os.sep, "/")
  if os.path.isabs(p) or p == "." or p.startswith("../"):
    return None
  return p


def _text(v, what: str) -> str:
  if not isinstance(v, str) or not v.strip():
    raise ValueError(f"{what} must be a non-empty string, got {v!r}")
  return v.strip()


def _json_entry(obj) -> tuple[str, Entry]:
  """(file, Entry) of one parsed JSON line; ``ValueError`` says what is wrong."""
  if not isinstance(obj, dict):
    raise ValueError(f"must be a JSON object with keys {JSON_KEYS}, got {type(obj).__name__}")
  unknown = sorted(set(obj) - set(JSON_KEYS))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown}: allowed keys are {JSON_KEYS}")
  file = _norm(obj.get("file"))
  if file is None:
    raise ValueError(f"'file' must be a file name relative to the folder, got {obj.get('file')!r}")
  if ("caption" in obj) == ("captions" in obj):
    raise ValueError(f"{file}: give exactly one of 'caption' (a string) or 'captions' (a list)")
  if "caption" in obj:
    caps = (_text(obj["caption"], "'caption'"),)
  else:
    if not isinstance(obj["captions"], list) or not obj["captions"]:
      raise ValueError(f"{file}: 'captions' must be a non-empty list of strings")
    caps = tuple(_text(c, "each of 'captions'") for c in obj["captions"])
  qa = obj.get("qa", [])
  if not isinstance(qa, list):
    raise ValueError(f"{file}: 'qa' must be a list of {{'question': .., 'answer': ..}}")
  pairs = []
  for p in qa:
    if not isinstance(p, dict) or set(p) != {"question", "answer"}:
      raise ValueError(f"{file}: each 'qa' item must be {{'question': .., 'answer': ..}}, got {p!r}")
    pairs.append((_text(p["question"], "'question'"), _text(p["answer"], "'answer'")))
  split = obj.get("split")
  if split is not None and split not in SPLITS:
    raise ValueError(f"{file}: 'split'={split!r} is invalid: allowed values are {SPLITS}")
  return file, Entry(file, caps, tuple(pairs), split)


def _read_jsonl(path: str, problems: Problems) -> tuple[list[Entry], set[str]]:
  name = os.path.basename(path)
  entries: dict[str, tuple[int, Entry]] = {}
  mentioned = set()  # files of rejected lines: not reported again as "without a caption"
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{name} line {lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        problems.add(where, f"is not valid JSON ({e.msg} at column {e.colno})")
        continue
      if isinstance(obj, dict) and _norm(obj.get("file")):
        mentioned.add(_norm(obj.get("file")))
      try:
        file, entry = _json_entry(obj)
      except ValueError as e:
        problems.add(where, str(e))
        continue
      if file in entries:
        problems.add(f"{where}", f"duplicate file name {file!r} (already on line "
                     f"{entries[file][0]}): give all its captions in one line as 'captions'")
        continue
      entries[file] = (lineno, entry)
  return [e for _, e in entries.values()], mentioned


def _read_csv(path: str, problems: Problems) -> tuple[list[Entry], set[str]]:
  name = os.path.basename(path)
  caps: dict[str, list[str]] = {}
  splits: dict[str, Optional[str]] = {}
  bad: set[str] = set()
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    cols = [c.strip() for c in (reader.fieldnames or [])]
    if "file" not in cols or "caption" not in cols or set(cols) - set(CSV_COLUMNS):
      raise ValueError(f"{path}: the header must name the columns file,caption and "
                       f"optionally split (allowed: {CSV_COLUMNS}), got {cols}")
    reader.fieldnames = cols
    for row in reader:
      where = f"{name} line {reader.line_num}"
      file = _norm(row.get("file"))
      if file is None:
        problems.add(where, f"'file' must be a file name relative to the folder, got "
                     f"{row.get('file')!r}")
        continue
      caption, split = (row.get("caption") or "").strip(), (row.get("split") or "").strip() or None
      if not caption:
        problems.add(where, f"{file}: empty caption")
        bad.add(file)
        continue
      if split is not None and split not in SPLITS:
        problems.add(where, f"{file}: split={split!r} is invalid: allowed values are {SPLITS}")
        bad.add(file)
        continue
      if file in splits and splits[file] != split:
        problems.add(where, f"{file}: split {split!r} disagrees with its earlier row's "
                     f"{splits[file]!r}")
        continue
      caps.setdefault(file, []).append(caption)
      splits[file] = split
  return [Entry(f, tuple(c), (), splits[f]) for f, c in caps.items()], bad


def captions_path(folder: str) -> str:
  """The folder's captions file; ``ValueError`` if it has none or both."""
  found = [n for n in CAPTION_FILES if os.path.isfile(os.path.join(folder, n))]
  if not found:
    raise ValueError(f"image_text folder {folder!r} has no captions file: expected one of "
                     f"{CAPTION_FILES} at its top level")
  if len(found) > 1:
    raise ValueError(f"image_text folder {folder!r} has both {found}: keep only one")
  return os.path.join(folder, found[0])


def image_files(folder: str) -> list[str]:
  """Files below ``folder`` with an image extension, relative and sorted (hidden skipped)."""
  out = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for f in files:
      if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
        out.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
  return sorted(out)


def scan(folder: str, skip_bad: bool = False) -> tuple[list[Entry], list[Problem]]:
  """The captioned images of ``folder`` (in file-name order) and the problems skipped.

  Reads only the captions file and the directory listing; images are decoded later.
  """
  problems = Problems(folder, skip_bad)
  path = captions_path(folder)
  reader = _read_jsonl if path.endswith(".jsonl") else _read_csv
  entries, mentioned = reader(path, problems)
  on_disk = set(image_files(folder))
  kept = []
  for e in sorted(entries, key=lambda e: e.file):
    if e.file in on_disk or os.path.isfile(os.path.join(folder, e.file)):
      kept.append(e)
    else:
      problems.add(e.file, f"named in {os.path.basename(path)} but there is no such file in "
                   "the folder")
  captioned = {e.file for e in entries} | mentioned
  for f in sorted(on_disk - captioned):
    problems.add(f, f"image without a caption (add a line for it to {os.path.basename(path)})")
  return kept, problems.items


def split_hash(file: str) -> float:
  """``file``'s position in [0, 1): the first 8 bytes of sha256 of its name / 2**64."""
  return int.from_bytes(hashlib.sha256(file.encode("utf-8")).digest()[:8], "big") / 2.0**64


def assign_splits(entries: Sequence[Entry], fractions: Sequence[float]) -> dict[str, list[Entry]]:
  """Entries by split: the given split, else by ``split_hash`` against the cumulative
  ``fractions`` (train, validation, test).

  A split with a positive fraction that the hash leaves empty (likely with a handful of
  images) takes the hash-assigned file nearest to its interval from a split that keeps at
  least one file. A split still empty is left empty (the builder then raises); one of
  fraction 0 and no given file is simply absent.
  """
  bounds, lo = {}, 0.0
  for s, f in zip(SPLITS, fractions):
    bounds[s] = (lo, lo + f)
    lo += f
  out: dict[str, list[Entry]] = {s: [] for s in SPLITS}
  hashed: dict[str, list[tuple[float, Entry]]] = {s: [] for s in SPLITS}
  for e in entries:
    if e.split is not None:
      out[e.split].append(e)
      continue
    h = split_hash(e.file)
    # The last split with a positive fraction takes what rounding leaves above 1.
    s = next((s for s in SPLITS if bounds[s][0] <= h < bounds[s][1]),
             [s for s, f in zip(SPLITS, fractions) if f > 0][-1])
    hashed[s].append((h, e))
  for s, f in zip(SPLITS, fractions):
    if f <= 0 or out[s] or hashed[s]:
      continue
    lo, hi = bounds[s]
    donors = [(max(lo - h, h - hi, 0.0), h, d) for d in SPLITS if d != s
              for h, _ in hashed[d] if len(out[d]) + len(hashed[d]) > 1]
    if donors:
      _, h, d = min(donors)
      moved = next(p for p in hashed[d] if p[0] == h)
      hashed[d].remove(moved)
      hashed[s].append(moved)
  for s in SPLITS:
    out[s].extend(e for _, e in hashed[s])
    out[s].sort(key=lambda e: e.file)
  return out
