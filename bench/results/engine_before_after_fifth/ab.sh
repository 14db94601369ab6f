for i in 1 2; do
  for side in before after; do
    dir=/work/main; [ $side = before ] && dir=/tmp/base1870
    (cd $dir && /work/main/.venv/bin/python -m bench.engine_bench --repeats 1 --threads 2 --family-dir /tmp/eb/family --out /tmp/eb/$side$i > /tmp/eb/$side$i.log 2>&1)
  done
done
echo done > /tmp/eb/finished
