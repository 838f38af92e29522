"""Read an export through LLaMA-Factory's own SFT data pipeline and say whether the client got what the export promised.

Runs with an interpreter that has LLaMA-Factory, not with the project's environments (LLaMA-Factory 0.9.5 caps
transformers at 5.6; our locks hold 5.23). One way, on this CPU machine (~3 min):

    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install --find-links /opt/wheels torch==2.13.0 llamafactory==0.9.5
    # its torchvision / torchaudio wheels are CUDA builds: the project's torchvision hook, and no audio
    site=$(/tmp/lf/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp deploy/env/cpu/omnithought_torchvision_ops.py $site/ && \\
      echo "import omnithought_torchvision_ops" > $site/omnithought_torchvision_ops.pth
    /tmp/lf/bin/pip uninstall -y torchaudio && mkdir $site/torchaudio && touch $site/torchaudio/__init__.py
    /tmp/lf/bin/python bench/llamafactory_reads_export.py EXPORT_DIR MODEL_DIR [--cutoff-len N]

Prints JSON, as its last line: examples LLaMA-Factory read (beside the export's own count), the longest example as it
counts it (beside the export's own count, `max_tokens`), how many it cut (an example differs from the same example read
without a cutoff, or its reply lost its end of turn or its `Answer:` line), the image token counts it produced, and any
added token inside a label span but the template's end of turn and the reply's <think> / </think>.
Exit 1 when it cut, lost or misread anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--template", default="qwen2_vl")
    parser.add_argument("--cutoff-len", type=int, default=None, help="default: the export's own (manifest.json)")
    args = parser.parse_args()

    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    manifest = json.loads((args.export / "manifest.json").read_text())
    cutoff = args.cutoff_len or manifest.get("cutoff_len") or 1_000_000
    name = manifest["dataset_name"]

    def read(cutoff_len: int):
        # LLaMA-Factory prints an example while it reads (its logger writes to stdout whatever we do).
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):
            model_args, data_args, training_args, _, _ = get_train_args(
                {
                    "stage": "sft",
                    "do_train": True,
                    "model_name_or_path": str(args.model),
                    "dataset": name,
                    "dataset_dir": str(args.export),
                    "template": args.template,
                    "cutoff_len": cutoff_len,
                    "output_dir": out,
                    "overwrite_cache": True,
                    "report_to": "none",
                    "preprocessing_num_workers": 1,
                    "finetuning_type": "full",
                }
            )
            tokenizer_module = load_tokenizer(model_args)
            template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
            dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)["train_dataset"]
            return tokenizer_module["tokenizer"], list(dataset)

    tokenizer, rows = read(cutoff)
    _, whole = read(1_000_000)  # the same examples with no cutoff: what a cut example lost
    added = {int(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()}
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    allowed = {"<|im_end|>", "<think>", "</think>"}
    cut, leaked, lengths, image_tokens = [], [], [], []
    for index, (row, full) in enumerate(zip(rows, whole, strict=False)):  # a count that differs is reported below
        labels = [i for i in row["labels"] if i != -100]
        lengths.append(len(full["input_ids"]))
        image_tokens.append(row["input_ids"].count(image_token))
        reply = tokenizer.decode(labels, skip_special_tokens=False)
        if row["input_ids"] != full["input_ids"] or end_of_turn not in labels[-2:] or "Answer:" not in reply:
            cut.append(index)
        bad = sorted({added[i] for i in labels if i in added and added[i] not in allowed})
        if bad:
            leaked.append({"example": index, "tokens": bad})
    report = {
        "export": str(args.export),
        "examples_exported": manifest["examples"],
        "examples_read": len(rows),
        "cutoff_len": cutoff,
        "export_max_tokens": manifest.get("max_tokens"),
        "client_max_tokens": max(lengths, default=0),
        "cut_by_the_client": len(cut),
        "label_spans_with_other_tokens": leaked[:10],
        "image_tokens_per_example": sorted(set(image_tokens)),
    }
    print(json.dumps(report), flush=True)  # the last line (LLaMA-Factory's logger writes to stdout too)
    return 0 if len(rows) == manifest["examples"] and not cut and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
