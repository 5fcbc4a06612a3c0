"""``--config`` as a file path or as the name of a config shipped in ``gptjax.configs``.

ml_collections' ``config_flags.DEFINE_config_file`` loads a *path*, and its
``--config.section.key=value`` overrides are applied by the same flag while absl parses the
command line, so a name cannot be resolved afterwards (the overrides would already have
failed or been dropped). The name is therefore rewritten to the shipped file's path in argv
*before* absl parses it: ``--config demo`` and ``--config=demo`` become
``--config=/.../gptjax/configs/demo.py``, and overrides then work exactly as with a path.
"""
from __future__ import annotations

import os
from typing import Sequence

from gptjax import configs as shipped


def _resolve(value: str, names: Sequence[str]) -> str:
  if os.path.exists(value) or value not in names:
    return value  # a path (ml_collections reports a missing file itself)
  return shipped.path(value)


def resolve_config_arg(argv: Sequence[str], names: Sequence[str]) -> list[str]:
  """``argv`` with a ``--config NAME`` / ``--config=NAME`` of a shipped config (one of
  ``names``) replaced by ``--config=PATH``; everything else unchanged. A value that is
  neither an existing file nor a shipped name raises ``SystemExit`` listing the names."""
  out, i = [argv[0]] if argv else [], 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":  # absl stops parsing flags here: so do we
      out.extend(argv[i:])
      break
    value = None
    if arg in ("--config", "-config") and i + 1 < len(argv):
      value, i = argv[i + 1], i + 2
    elif arg.startswith(("--config=", "-config=")):
      value, i = arg.split("=", 1)[1], i + 1
    else:
      out.append(arg)
      i += 1
      continue
    path = _resolve(value, names)
    if not os.path.exists(path):
      raise SystemExit(f"--config={value}: no such config file, and not a shipped config "
                       f"(shipped: {', '.join(names)})")
    out.append(f"--config={path}")
  return out
