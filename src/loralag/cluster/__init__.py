"""Scaling out on Ray (optional: `pip install "loralag[ray]"`): the same jobs as a local run, spread over a
Ray cluster's workers, with the same results.

connect   joining or starting a cluster (`--ray [ADDRESS]`), the one-line "install loralag[ray]" error, the
          workers' thread setup, remote user errors raised as themselves
pool      a pool of worker actors (Ray restarts a dead one and retries its tasks; one that cannot come back
          has its tasks moved to the others) and the loop that keeps them busy
train     training adapters (`cluster.train.train_adapters(..., address=)`, `loralag train --ray`): the
          driver keeps the cache and writes every folder, the workers train
build     aligning adapters for a library on the workers (`loralag build --ray`); the driver alone commits
evaluate  answering questions on the workers: `loralag eval --model --ray` (batches of a dataset); the LAMA
          bench's answer shares run as Ray tasks from experiments.lama.answering.bench_shares
serve     N replicas of the OpenAI-compatible server behind one endpoint with Ray Serve (`loralag serve
          --ray-replicas N`)

Imports training, library, routing, evaluation and serve (each only inside the function that needs it, so
importing loralag.cluster costs neither torch nor ray); only the experiments and the CLI import it, where a
caller asks for Ray.
"""
