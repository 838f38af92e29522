"""Functions of an omnithought local lmms-eval task (copied into the task folder as utils.py).

Self-contained on purpose: lmms-eval imports this file from the task folder in its own
environment. The prompt is the one the students were trained on (the question, then the
options as `A. text`); the reply is scored on its `Answer:` line (the trained format), else a
`\\boxed{}`, else its last line.
"""

import re

ANSWER_LINE = re.compile(r"answer\s*[:：]\s*(.+)", re.IGNORECASE)
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def doc_to_visual(doc):
    return [image.convert("RGB") for image in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    options = ""
    if doc["choices"]:
        options = "\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {choice}" for i, choice in enumerate(doc["choices"]))
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{options}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answer"]


def extract_answer(reply):
    reply = (reply or "").split("</think>")[-1]
    found = ANSWER_LINE.findall(reply)
    if found:
        return found[-1].strip()
    boxed = BOXED.findall(reply)
    if boxed:
        return boxed[-1].strip()
    # The last line as the model broke it: "\n" (or "\r"), not the Unicode separators a generation may hold inside a line.
    lines = [line.strip() for line in reply.replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1] if lines else ""


def is_correct(extracted, doc):
    answer = str(doc["answer"]).strip()
    guess = extracted.strip().rstrip(".").strip()
    if doc["answer_type"] == "multiple_choice":
        letter = re.match(r"^\(?([A-Z])\)?(?:[.):\s]|$)", guess)
        if letter:
            return letter.group(1) == answer.upper()
        index = ord(answer.upper()) - 65
        return 0 <= index < len(doc["choices"]) and guess.casefold() == str(doc["choices"][index]).strip().casefold()
    if doc["answer_type"] == "numeric":
        try:
            return abs(float(guess.replace(",", "")) - float(answer.replace(",", ""))) <= 1e-6 * max(
                1.0, abs(float(answer.replace(",", "")))
            )
        except ValueError:
            return False
    return " ".join(guess.casefold().split()) == " ".join(answer.casefold().split())


def process_results(doc, results):
    extracted = extract_answer(results[0] if results else "")
    return {"accuracy": 1.0 if is_correct(extracted, doc) else 0.0}
