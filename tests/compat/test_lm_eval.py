"""lm-evaluation-harness (PyPI `lm-eval[api]`) against tilt, as its users run it: the
`local-completions` model over `/v1/completions`, tokenizing through tilt (`tokenizer_backend=remote`
reads `/tokenizer_info`, `/tokenize`, `/detokenize`), on the task files in tests/compat/lm_eval.
Nothing comes from a model or dataset hub.

- `tilt_mmlu` (loglikelihood): its accuracy must be the one tilt's own `/v1/score` gives on the same
  questions, and the letters it picks must vary (when prompt tokens had no log-probs, every choice
  scored 0 and the first letter always won).
- `tilt_keywords_steered` (generate_until) passes an `alignment` object through the task's
  generation kwargs: its answers carry a word the prompts never mention; the unsteered control's
  do not.
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
URL = os.environ["TILT_URL"]


def run_harness(out: Path) -> dict:
    model = requests.get(f"{URL}/v1/models", timeout=30).json()["data"][0]["id"]
    command = [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "local-completions",
        "--model_args",
        f"model={model},base_url={URL}/v1/completions,tokenizer_backend=remote,tokenized_requests=True",
        "--include_path", "tests/compat/lm_eval",
        "--tasks", "tilt_mmlu", "tilt_keywords_plain", "tilt_keywords_steered",
        "--output_path", str(out),
        "--log_samples",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(out / "hf"), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [results] = glob.glob(str(out / "*" / "results_*.json"))
    return json.load(open(results))


def samples(out: Path, task: str) -> list:
    [path] = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    return sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])


def test_lm_eval_harness_scores_and_steers_through_tilt(tmp_path):
    results = run_harness(tmp_path)

    # Multiple choice: the harness's accuracy is tilt's own scoring's.
    questions = samples(tmp_path, "tilt_mmlu")
    assert len(questions) == 40
    harness_acc = results["results"]["tilt_mmlu"]["acc,none"]
    picks, right = [], 0
    for s in questions:
        context = s["arguments"]["gen_args_0"]["arg_0"]
        choices = [s["arguments"][f"gen_args_{i}"]["arg_1"] for i in range(4)]
        r = requests.post(f"{URL}/v1/score", json={"prompt": context, "responses": choices}, timeout=60)
        assert r.status_code == 200, r.text
        ours = [d["logprob"] for d in r.json()["data"]]
        theirs = [float(resp[0][0]) for resp in s["resps"]]  # logged as strings
        for a, b in zip(ours, theirs):
            assert abs(a - b) < 0.05, (s["doc_id"], ours, theirs)
        pick = max(range(4), key=lambda i: ours[i])
        picks.append(pick)
        right += pick == int(s["target"])
    assert harness_acc == right / len(questions)
    # Unscored choices all tie and the first letter wins: accuracy is then one letter's share.
    assert len(set(picks)) > 1, "one letter always wins: the choices were not scored"

    # Free generation with and without the alignment object.
    def with_word(task):
        texts = [s["resps"][0][0] for s in samples(tmp_path, task)]
        assert len(texts) == 6
        return sum("ocean" in t.lower() for t in texts), texts

    steered, texts = with_word("tilt_keywords_steered")
    plain, plain_texts = with_word("tilt_keywords_plain")
    assert steered >= 5, texts
    assert plain <= 1, plain_texts
