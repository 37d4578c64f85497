"""``flexproj demo``: the TokenFLEX experiment in miniature, on a laptop CPU.

The default experiment converts a trained VLM (``run_convert``, :mod:`.convert`), reading
top to bottom through one module per job:

1. :mod:`.config`: what a run depends on (family, question task, steps, budgets);
2. :mod:`.data`: the synthetic VQA splits on disk;
3. :mod:`.base_model`: the tiny stock model each seed starts from;
4. :mod:`.rows`: the stock training and every conversion row, through the recipes;
5. :mod:`.evaluation`: each row evaluated with the recipe evaluator;
6. :mod:`.report`: rows gathered over seeds, costs, the printed tables;
7. :mod:`.plot`: accuracy against the budget;
8. :mod:`.docs`: README's and docs/DEMO.md's tables written from ``results.json``.

``--experiment scratch`` (:mod:`.scratch`) trains fixed-N and flexible models from scratch
(the paper's own table).
"""

from flexproj.demo.config import (
    FAMILY_SETUPS,
    PROMPTS,
    ROW_LABELS,
    TASKS,
    ConvertConfig,
    DemoConfig,
    quick_config,
    quick_convert_config,
)
from flexproj.demo.convert import run_convert
from flexproj.demo.report import convert_results, format_convert_report, format_convert_table
from flexproj.demo.scratch import (
    answer_logits,
    build_model,
    encode,
    eval_samples,
    format_table,
    run_demo,
)

__all__ = [
    "FAMILY_SETUPS",
    "PROMPTS",
    "ROW_LABELS",
    "TASKS",
    "ConvertConfig",
    "DemoConfig",
    "answer_logits",
    "build_model",
    "convert_results",
    "encode",
    "eval_samples",
    "format_convert_report",
    "format_convert_table",
    "format_table",
    "quick_config",
    "quick_convert_config",
    "run_convert",
    "run_demo",
]
