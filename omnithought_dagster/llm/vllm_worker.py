"""vLLM's offline engine fed one request at a time: the process behind the `vllm` backend's batch mode.

    .venv-vllm/bin/python omnithought_dagster/llm/vllm_worker.py --model DIR [vLLM engine flags]

Runs in the vLLM environment by path (it imports vLLM and the standard library only; this package is not installed
there). Started and stopped by llm/vllm_offline.py, under the step's process guard. The protocol is JSON lines:
- standard input: one request per line, `{"id", "messages", "max_tokens", "temperature", "top_p", "seed", "json_schema",
  "regex"}`; the end of input means no more requests (the worker finishes what it holds, then exits);
- standard output: `{"ready": true}` once the engine is up, then one line per request as the engine finishes it:
  `{"id", "text", "finish_reason", "n_prompt_tokens", "n_tokens"}` or `{"id", "error"}` for a request the engine refused.
  Everything else the process prints (vLLM's logs) goes to standard error.
Requests join the running batch between engine steps (continuous batching, as `LLM.chat` runs a list) and each reply
leaves as soon as it is finished, so the caller caches replies while the engine works: a killed step loses only what it
had not flushed. With OMNITHOUGHT_ENGINE_JOURNAL set, the key of every request the engine finished is appended to that
file: a count of the work done, kept apart from the caller's cache (the resume tests read it).
"""

import json
import os
import queue
import sys
import threading


def main(argv: list[str]) -> int:
    # Run by path, this file's folder leads sys.path: its neighbours (settings.py, runner.py, ...) must not shadow
    # what vLLM imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
    # The protocol owns the real standard output; vLLM (and the engine processes it starts) print to standard error.
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm_worker")).parse_args(argv)
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    engine = llm.llm_engine
    # What the server does for a request (its to_sampling_params): the model's generation config (its
    # generation_config.json, as --generation-config says) fills what a request leaves unset; a request's own values win.
    defaults = llm.model_config.get_diff_sampling_param()
    neutral = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_k": 0, "min_p": 0.0}
    fill = {name: defaults.get(name, value) for name, value in neutral.items()}
    journal_path = os.environ.get("OMNITHOUGHT_ENGINE_JOURNAL")
    journal = open(journal_path, "a", encoding="utf-8", buffering=1) if journal_path else None

    def emit(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    inbox: queue.Queue = queue.Queue()

    def read_requests() -> None:
        # JSON lines end at "\n" only: a request's text may hold U+2028 and the like.
        for line in sys.stdin.buffer:
            if line.strip():
                inbox.put(line)
        inbox.put(None)

    threading.Thread(target=read_requests, daemon=True).start()
    emit({"ready": True})

    pending: dict[str, tuple[str, str | None]] = {}  # the request id outputs carry -> (our id, the key, for the journal)
    closed = False
    while True:
        busy = engine.has_unfinished_requests()
        if not closed:
            lines = []
            try:
                lines.append(inbox.get(block=not busy))
                while True:
                    lines.append(inbox.get_nowait())
            except queue.Empty:
                pass
            for line in lines:
                if line is None:
                    closed = True
                    continue
                request_id = None
                try:
                    request = json.loads(line)
                    request_id = request["id"]
                    structured = None
                    if request.get("json_schema") is not None:
                        structured = StructuredOutputsParams(json=request["json_schema"])
                    elif request.get("regex") is not None:
                        structured = StructuredOutputsParams(regex=request["regex"])
                    max_tokens = request["max_tokens"]
                    if defaults.get("max_tokens") is not None:
                        max_tokens = min(max_tokens, defaults["max_tokens"])
                    params = SamplingParams.from_optional(
                        **fill,
                        max_tokens=max_tokens,
                        temperature=request["temperature"],
                        top_p=request["top_p"],
                        seed=request.get("seed"),
                        stop_token_ids=defaults.get("stop_token_ids"),
                        structured_outputs=structured,
                    )
                    (engine_id,) = llm.enqueue_chat([request["messages"]], [params], use_tqdm=False)
                    # enqueue_chat answers the engine's internal id ("7-1a2b3c4d"); outputs carry the id it was added
                    # under ("7"): the LLM's own counter, the part before the suffix.
                    pending[engine_id.split("-", 1)[0]] = (request_id, request.get("key"))
                except Exception as exc:  # this request only: an image the processor refuses, a prompt too long
                    emit({"id": request_id, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        if not engine.has_unfinished_requests():
            for request_id, _ in pending.values():  # none should be left; were one, its caller must not wait forever
                emit({"id": request_id, "error": "the engine finished without this request's output"})
            pending.clear()
            if closed:
                break
            continue
        for output in engine.step():
            if not output.finished or output.request_id not in pending:
                continue
            request_id, key = pending.pop(output.request_id)
            completion = output.outputs[0] if output.outputs else None
            if completion is None or completion.finish_reason not in ("stop", "length"):
                reason = completion.finish_reason if completion is not None else "no output"
                emit({"id": request_id, "error": f"the engine ended the request: {reason}"})
                continue
            if journal is not None:
                journal.write(f"{key}\n")
            emit(
                {
                    "id": request_id,
                    "text": completion.text,
                    "finish_reason": completion.finish_reason,
                    "n_prompt_tokens": len(output.prompt_token_ids or []),
                    "n_tokens": len(completion.token_ids),
                }
            )
    protocol.close()
    return 0


if __name__ == "__main__":  # vLLM starts engine processes that re-import the main module: the guard is required
    sys.exit(main(sys.argv[1:]))
