"""The README's library example runs as written (it is the first thing a user pastes)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_library_example_runs():
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text[text.index("## Library example"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  scope: dict = {}
  exec(compile(code, "README.md:library-example", "exec"), scope)
  vlm, new, cfg = scope["vlm"], scope["new"], scope["cfg"]
  assert type(vlm).__name__ == "VLM" and cfg.num_image_tokens == 64
  assert cfg.attention == "linear" and len(vlm.decoder.blocks) == 1
  assert new.shape == (1, 16)
