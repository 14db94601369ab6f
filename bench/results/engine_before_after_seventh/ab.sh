#!/bin/bash
# engine_bench before (8b7d557, a worktree at /tmp/before) / after (HEAD), alternating: rounds 1-2 before first,
# rounds 3-4 after first.
for round in 1 2 3 4; do
  sides="before after"; [ $round -ge 3 ] && sides="after before"
  for side in $sides; do
    dir=/tmp/before; [ $side = after ] && dir=/work/main
    (cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python -m bench.engine_bench --repeats 1 --threads 2 \
      --out bench/results/engine_before_after_seventh/$side-$round)
  done
done
# Rounds 5-6 (before first) after the mixtures of experts joined the fast step (HEAD at c4c850b), same command.
