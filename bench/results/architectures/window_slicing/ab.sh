# Window slicing in the fast step: /tmp/before (the commit before it) against /work/main, alternating.
for i in 1 2; do
  for side in before after; do
    dir=/work/main; [ $side = before ] && dir=/tmp/before
    (cd $dir && /work/main/.venv/bin/python -m bench.architectures --architectures gemma3 llama --levels 1 16 \
       --rounds 1 --steps 16 --threads 2 --prompt-tokens 1024 2>/dev/null | grep "^| \(gemma3\|llama\)" | sed "s/^/$side /")
  done
done
