"""The compression recipe's report: one row per stage (teacher, student, pruned, int8) with
the same measurements, as a Markdown table, a JSON file and a quality-vs-size plot."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from gptjax.train.metrics import new_figure


@dataclasses.dataclass
class StageResult:
  stage: str
  params: int
  bytes_on_disk: int
  array_bytes: int  # parameter arrays in memory (int4 at 0.5 B): no file-format overhead
  eval_loss: float
  caption_exact_match: Optional[float]
  vqa_accuracy: Optional[float]
  decode_tokens_per_s: float
  note: str = ""
  # The teacher's other tasks, measured the same way on every stage (when it has them):
  # image<->text recall@1 by caption likelihood ('gen_i2t_r1', 'gen_t2i_r1') and by its
  # contrastive head ('con_*'), and the prompt-match rate of drawings ('draw_*').
  tasks: dict = dataclasses.field(default_factory=dict)

  def __str__(self) -> str:
    def frac(x):
      return "-" if x is None else f"{x:.3f}"
    return (f"{self.params:,} params, {self.bytes_on_disk:,} bytes on disk, test loss "
            f"{self.eval_loss:.4f}, caption EM {frac(self.caption_exact_match)}, VQA "
            f"{frac(self.vqa_accuracy)}, {self.decode_tokens_per_s:,.0f} decode tok/s"
            + "".join(f", {k} {v:.3f}" for k, v in self.tasks.items()))


TASK_COLUMNS = {"gen_i2t_r1": "i→t R@1 (gen)", "gen_t2i_r1": "t→i R@1 (gen)",
                "con_i2t_r1": "i→t R@1 (con)", "con_t2i_r1": "t→i R@1 (con)",
                "draw_color_and_count": "draw colour+count",
                "draw_best_color_and_count": "draw colour+count (best of K)",
                "draw_all": "draw all"}


def write_report(results: list[StageResult], workdir: str, teacher: StageResult) -> str:
  tasks = [k for k in TASK_COLUMNS if any(k in r.tasks for r in results)]
  lines = ["# Compression report", "",
           "Every stage evaluated on the same test split; bytes = the saved parameter "
           "checkpoint on disk (measured); decode = greedy tokens/s on this machine.", "",
           "| stage | params | bytes on disk | vs teacher | array bytes | eval loss | caption EM "
           "| VQA acc | VQA vs teacher | decode tok/s | "
           + "".join(f"{TASK_COLUMNS[k]} | " for k in tasks) + "note |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---|"]
  fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
  for r in results:
    rel_vqa = (r.vqa_accuracy / teacher.vqa_accuracy
               if r.vqa_accuracy is not None and teacher.vqa_accuracy else None)
    lines.append(
        f"| {r.stage} | {r.params:,} | {r.bytes_on_disk:,} | "
        f"1/{teacher.bytes_on_disk / max(r.bytes_on_disk, 1):.1f} | {r.array_bytes:,} | "
        f"{r.eval_loss:.4f} | "
        f"{fmt(r.caption_exact_match)} | {fmt(r.vqa_accuracy)} | {fmt(rel_vqa)} | "
        f"{r.decode_tokens_per_s:,.0f} | "
        + "".join(f"{fmt(r.tasks.get(k))} | " for k in tasks) + f"{r.note} |")
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
  _plot(results, os.path.join(workdir, "report.png"))
  return "\n".join(lines)


def _plot(results: list[StageResult], path: str) -> None:
  try:  # matplotlib is optional (the 'train' extra): without it, one warning and no PNG
    fig = new_figure(figsize=(6.5, 4.2))
  except ImportError:
    return
  ax = fig.subplots()
  x = [r.bytes_on_disk for r in results]
  for key, marker in (("vqa_accuracy", "o-"), ("caption_exact_match", "s--")):
    y = [getattr(r, key) for r in results]
    if all(v is not None for v in y):
      ax.plot(x, y, marker, label=key)
  for r in results:
    ax.annotate(r.stage, (r.bytes_on_disk, r.vqa_accuracy or 0), textcoords="offset points",
                xytext=(4, 6), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("bytes on disk (log)")
  ax.set_ylabel("accuracy (test split)")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("quality vs size")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
