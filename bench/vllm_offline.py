"""Raw vLLM offline generation of the same requests: run by bench/generation.py inside .venv-vllm.

.venv-vllm/bin/python bench/vllm_offline.py MODEL_DIR REQUESTS.json [TEXTS.json]  -> one JSON line on stdout
(TEXTS.json gets each request's reply by key)
"""

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    model, requests_path = sys.argv[1], sys.argv[2]
    texts_path = sys.argv[3] if len(sys.argv) > 3 else None
    requests = json.loads(open(requests_path).read())
    # The same engine settings the pipeline's server gets (llm/vllm_server.py): on the CPU build a seeded
    # request hit by a chunked prefill kills the engine (EngineDeadError), so chunked prefill is off.
    llm = LLM(
        model=model,
        enforce_eager=True,
        max_model_len=2048,
        enable_chunked_prefill=False,
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
    )
    params = [
        SamplingParams(
            max_tokens=r["max_tokens"],
            temperature=r["temperature"],
            top_p=r["top_p"],
            seed=r["seed"],
            structured_outputs=StructuredOutputsParams(json=r["json_schema"]) if r["json_schema"] else None,
        )
        for r in requests
    ]
    start = time.perf_counter()
    outputs = llm.chat([r["messages"] for r in requests], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    if texts_path:  # each request's reply, by key: the benchmark compares them with the pipeline's
        with open(texts_path, "w") as handle:
            json.dump({r["key"]: o.outputs[0].text for r, o in zip(requests, outputs, strict=True)}, handle)
    print(
        json.dumps(
            {
                "requests": len(requests),
                "generated_tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
            }
        )
    )


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    main()
