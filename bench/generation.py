"""Teacher generation throughput: the pipeline path against raw vLLM offline generation.

    .venv/bin/python bench/generation.py [--samples 100] [--rollouts 4] [--max-tokens 256]

Every side generates the same requests (same prompts with images, JSON-schema constraint,
sampling parameters and per-rollout seeds) on the same tiny model with the same vLLM build,
one after the other (start-ups excluded):
- raw_offline: `vllm.LLM.chat` over the whole list in the vLLM environment (the floor's peer);
- pipeline_batch: `generate_shard` (cache, parsing, flushes) through the `vllm` backend's batch
  mode: the offline engine worker (llm/vllm_offline.py) fed request by request;
- pipeline_server: `generate_shard` through the OpenAI client against a vLLM server the
  pipeline started (`--no-server` leaves it out).
Prints one JSON object with each side, its ratio to raw (tokens/s) and how many of its replies
are identical to raw's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omnithought_dagster.config import GenerationConfig, SeedSettings  # noqa: E402
from omnithought_dagster.llm.backends import OpenAIBackend  # noqa: E402
from omnithought_dagster.llm.settings import LLMConfig  # noqa: E402
from omnithought_dagster.llm.vllm_offline import VLLMOfflineBackend, offline_engine  # noqa: E402
from omnithought_dagster.llm.vllm_server import VLLMServer  # noqa: E402
from omnithought_dagster.models.tiny import TINY_TEACHER, build_tiny_model  # noqa: E402
from omnithought_dagster.seed.ingest import ingest_source  # noqa: E402
from omnithought_dagster.seed.sources.synthetic import SyntheticReader  # noqa: E402
from omnithought_dagster.store import CorpusStore  # noqa: E402
from omnithought_dagster.teacher.prompt import teacher_prompt  # noqa: E402
from omnithought_dagster.teacher.traces import generate_shard  # noqa: E402

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32, help="the server path's max_concurrency (teacher.max_concurrency)")
    parser.add_argument("--no-server", action="store_true", help="leave out the server path (raw and batch only)")
    args = parser.parse_args()
    generation = GenerationConfig(
        rollouts=args.rollouts, shards=1, max_tokens=args.max_tokens, reasoning_max_chars=300, answer_max_chars=24, flush_every=32
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(TINY_TEACHER, REPO / ".cache" / "models" / TINY_TEACHER.name)
        stores = {side: _seeded_store(tmp / side, args.samples) for side in ("batch", "server")}
        prompt = teacher_prompt(generation, "json")

        requests = _capture_requests(stores["batch"], prompt, generation)
        (tmp / "requests.json").write_text(json.dumps(requests))
        done = subprocess.run(
            [str(VLLM_PYTHON), str(REPO / "bench" / "vllm_offline.py"), str(model), str(tmp / "requests.json"), str(tmp / "raw.json")],
            capture_output=True,
            text=True,
            env=_offline_env(),
        )
        lines = [line for line in done.stdout.split("\n") if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"offline vLLM run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        raw = json.loads(lines[-1])
        raw_texts = json.loads((tmp / "raw.json").read_text())

        # The pipeline's batch mode: generate_shard -> VLLMOfflineBackend -> the offline engine worker (start-up excluded).
        config = LLMConfig(backend="vllm", mode="batch", model=str(model), python=str(VLLM_PYTHON), max_model_len=2048)
        engine = offline_engine(config, model=str(model), log_dir=tmp).start()
        try:
            backend = VLLMOfflineBackend(engine, identity="bench", window=config.batch_window)
            batch = _timed(stores["batch"], backend, prompt, generation, raw_texts)
        finally:
            engine.stop()
        sides = {"raw_offline": raw, "pipeline_batch": batch}
        if not args.no_server:
            with VLLMServer(str(VLLM_PYTHON), str(model), served_model_name="bench", max_model_len=2048, log_dir=tmp) as server:
                backend = OpenAIBackend(server.base_url, "bench", identity="bench", max_concurrency=args.concurrency)
                sides["pipeline_server"] = _timed(stores["server"], backend, prompt, generation, raw_texts)
    report = {
        "benchmark": "teacher_generation",
        "model": TINY_TEACHER.name,
        "samples": args.samples,
        "rollouts": args.rollouts,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        **sides,
        "ratio_batch_tokens_per_s": round(batch["tokens_per_s"] / raw["tokens_per_s"], 3),
    }
    if "pipeline_server" in sides:
        report["ratio_server_tokens_per_s"] = round(sides["pipeline_server"]["tokens_per_s"] / raw["tokens_per_s"], 3)
    print(json.dumps(report, indent=2))


def _seeded_store(folder: Path, samples: int) -> CorpusStore:
    store = CorpusStore(str(folder))
    seeded = ingest_source(
        "bench",
        SyntheticReader(samples, seed=77).records(),
        SeedSettings(near_duplicate_max_distance=-1),
        image_root=None,
        put_image=store.images.put,
    )
    store.write_partition("seed_pool", "bench", seeded.kept)
    return store


def _timed(store, backend, prompt, generation, raw_texts: dict) -> dict:
    """One pipeline pass over the shard (cache, parsing and flushes included), and how many replies equal raw vLLM's."""
    start = time.perf_counter()
    result = generate_shard(store, "bench", "000", backend, prompt, generation)
    seconds = time.perf_counter() - start
    stats = result.stats
    errors = sorted({e for e in result.rows.column("error").to_pylist() if e})
    same = sum(1 for key, text in raw_texts.items() if key in result.completions and result.completions[key].text == text)
    return {
        "requests": stats.sent,
        "generated_tokens": stats.generated_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(stats.generated_tokens / seconds, 1),
        "traces_per_s": round(stats.sent / seconds, 1),
        "failures": stats.failed,
        "errors": errors[:3],
        "cache_flushes": stats.flushes,
        "replies_identical_to_raw": same,
    }


def _capture_requests(store, prompt, generation) -> list[dict]:
    """The exact requests the pipeline sends, captured from generate_shard with a recording backend."""
    captured = []

    class Recorder:
        identity, supports_structured_output, max_concurrency = "bench", True, 8

        async def complete(self, request):
            captured.append(dataclasses.asdict(request))
            from omnithought_dagster.llm.backends import Completion

            return Completion(request.key, None, "error", error="recorded only")

        async def aclose(self):
            return None

    generate_shard(store, "bench", "000", Recorder(), prompt, generation)
    return captured


def _offline_env() -> dict:
    import os

    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


if __name__ == "__main__":
    main()
