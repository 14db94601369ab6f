#!/bin/bash
# engine_bench before (b6e6300) / after (HEAD), alternating, 2 rounds
for round in 1 2; do
  for side in before after; do
    dir=/tmp/before; [ $side = after ] && dir=/work/main
    (cd $dir && HF_HUB_OFFLINE=1 /work/main/.venv/bin/python -m bench.engine_bench --repeats 1 --threads 2 --out /tmp/ab/$side-$round > /tmp/ab/$side-$round.log 2>&1)
    echo "$side $round done $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)" >> /tmp/ab/progress
  done
done
echo ALLDONE >> /tmp/ab/progress
