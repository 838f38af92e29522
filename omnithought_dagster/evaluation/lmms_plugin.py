"""Our model class for lmms-eval: a local Qwen-VL folder (the tiny students), generating with transformers.

Registered through the `lmms_eval.models` entry point (pyproject.toml, lmms_entry.py) as `omnithought_vl`, so
`lmms_eval eval --model omnithought_vl --model_args pretrained=DIR` finds it once this package
is installed in the lmms-eval environment (the Makefile installs it there without dependencies).
Inputs are built exactly as in training (omnithought_dagster.models.vl_chat): the images, then
the task's text, as one user turn. Real checkpoints on GPUs use lmms-eval's own Qwen-VL classes
(`evaluation.lmms_model` in the project file). Imports lmms-eval: load it only in that environment.
"""

from __future__ import annotations

import sys
import time

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms


def record_problem(task: str, doc_id: int, problem: str) -> None:
    """Why an item got no reply, for the step (evaluation/run.py reads the file the environment names)."""
    import json
    import os

    from omnithought_dagster.evaluation.run import PROBLEMS_ENV

    path = os.environ.get(PROBLEMS_ENV)
    print(f"omnithought_vl: {task} item {doc_id}: {problem}", file=sys.stderr, flush=True)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"task": task, "doc_id": doc_id, "problem": problem[:500]}) + "\n")


class OmniThoughtVL(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 1, max_new_tokens: int = 64, **kwargs) -> None:
        super().__init__()
        from omnithought_dagster.models.vl_chat import load_vl_model

        self._device = device
        self.vl, self.model = load_vl_model(pretrained, device)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        import torch

        from omnithought_dagster.evaluation.run import PROGRESS_PREFIX
        from omnithought_dagster.progress import progress_line

        replies, started, every = [], time.monotonic(), max(1, len(requests) // 10)
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            try:
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
                content = [{"type": "image"} for _ in visuals] + [{"type": "text", "text": context}]  # the task's text: plain text
                inputs = {k: v.to(self._device) for k, v in self.vl.encode_prompt([{"role": "user", "content": content}], visuals).items()}
                with torch.no_grad():
                    output = self.model.generate(
                        **inputs, max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)), do_sample=False
                    )
                replies.append(self.vl.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
            except (ValueError, OSError, KeyError, IndexError) as exc:
                # One item's failure (text our encoding refuses, an image that does not decode) is that item's: scored wrong,
                # with the reason. Anything else (out of memory, a lost device) fails the run - not every item quietly.
                replies.append("")
                record_problem(task, doc_id, f"generation failed: {type(exc).__name__}: {exc}")
            if len(replies) % every == 0 or len(replies) == len(requests):  # run_lmms_eval forwards these lines to the step's log
                line = progress_line(f"evaluation {task}", len(replies), len(requests), time.monotonic() - started, "items")
                print(PROGRESS_PREFIX + line, file=sys.stderr, flush=True)
        return replies

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("omnithought_vl scores generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("omnithought_vl scores single-turn tasks only")
