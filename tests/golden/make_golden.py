"""Golden numerics for SmolLM2-135M-Instruct Q4_1 from an independent implementation (llama.cpp).

Reproduce (once; the output is committed):
    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/golden-venv/bin/python tests/golden/make_golden.py models/SmolLM2-135M-Instruct.Q4_1.gguf > tests/golden/smollm2.json
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

TOKENIZE = [
    "Hello world",
    "héllo wörld 日本語 🙂 naïve café",
    "12345 + 3.14159 = 12348.14159",
    "a  b\t\tc\n\n\nd   e  ",
    " leading space and trailing ",
    "I'm sure they'll say it's fine, won't they?",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé ÀÉÎÕÜ ñ ß ø å ç — “quotes” … ½",
]
PROMPTS = [
    "The capital of France is",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWrite a haiku about the sea<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who "
    "repaired every clock in the valley. One winter morning, a stranger arrived with a broken watch that",
]
GREEDY = 24
TOP = 10

llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, logits_all=True, verbose=False)
out = {"generator": "llama-cpp-python 0.3.36 (llama.cpp), n_ctx=512, f32 logits", "tokenize": [], "prompts": []}
for text in TOKENIZE:
    out["tokenize"].append({"text": text, "ids": llm.tokenize(text.encode(), add_bos=False, special=True)})
for text in PROMPTS:
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    last = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    order = np.argsort(-last)[:TOP]
    # Logits of every prompt position: a few samples to check the all-positions forward.
    positions = [1, len(ids) // 2, len(ids) - 2]
    rows = {str(p): [[int(t), float(llm.scores[p][t])] for t in np.argsort(-llm.scores[p])[:5]] for p in positions}
    greedy = []
    for _ in range(GREEDY):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(tok)
        if tok == llm.token_eos():
            break
        llm.eval([tok])
    out["prompts"].append({
        "text": text,
        "ids": ids,
        "top": [[int(t), float(last[t])] for t in order],
        "positions": rows,
        "greedy": greedy,
    })
json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
print()
