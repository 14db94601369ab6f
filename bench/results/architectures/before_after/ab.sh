# Before / after for the architecture.py change (Gemma and sliding windows on the fast paths): the commit before
# it in a worktree at /tmp/before, this tree at /work/main, each side's own bench, three alternating rounds.
# Output: ab.log (one line per side, architecture and row count).
for i in 1 2 3; do
  for side in before after; do
    dir=/work/main; [ $side = before ] && dir=/tmp/before
    (cd $dir && /work/main/.venv/bin/python -m bench.architectures --architectures llama qwen3 --levels 1 16 \
       --rounds 1 --steps 48 --threads 2 2>/dev/null | grep "^| \(llama\|qwen3\)" | sed "s/^/$side /")
  done
done
