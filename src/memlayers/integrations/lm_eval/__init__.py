"""lm-evaluation-harness integration (``pip install memlayers[eval]``).

Importing this package registers the lm-eval model ``memlayers``
(:class:`MemlayersLM`, model argument ``checkpoint=PATH``). The local task
``memlayers_fact_qa`` (the demo's fact QA, scored as ``memlayers eval --qa``)
lives in :data:`TASKS_DIR`; :func:`run_harness` (``memlayers lm-eval ...``) runs
lm-eval's command line with both available::

    memlayers lm-eval --model memlayers --model_args checkpoint=runs/tiny --tasks memlayers_fact_qa

From Python::

    import lm_eval
    from lm_eval.tasks import TaskManager
    from memlayers.integrations.lm_eval import TASK_NAME, TASKS_DIR

    lm_eval.simple_evaluate(model="memlayers", model_args="checkpoint=runs/tiny",
                            tasks=[TASK_NAME], task_manager=TaskManager(include_path=str(TASKS_DIR)))
"""

from memlayers.integrations.lm_eval.harness import TASK_NAME, TASKS_DIR, harness_argv, run_harness
from memlayers.integrations.lm_eval.model import MemlayersLM

__all__ = ["TASK_NAME", "TASKS_DIR", "MemlayersLM", "harness_argv", "run_harness"]
