#!/usr/bin/env bash
# Container entry point.
#   IMAGE --nproc_per_node=8 scripts/train_nvae_evalp.py ...   -> torchrun --nproc_per_node=8 ...
#   IMAGE scripts/generate.py ...                              -> torchrun scripts/generate.py ...
#   IMAGE python scripts/evaluate.py ... | bash | pytest ...   -> run as given (exec)
# Under torchrun, SIGTERM/SIGINT (docker stop, Kubernetes eviction, Slurm pre-emption) are forwarded
# to torchrun, which forwards them to every worker; the workers checkpoint and exit. torchrun itself
# then fails with a generic status, so the container exits 75 (EX_TEMPFAIL: "restart me with
# --resume auto") whenever it was asked to stop.
set -uo pipefail

case "${1:-}" in
  -*|*.py) set -- torchrun "$@" ;;
  *) exec "$@" ;;  # direct exec: the program gets signals and the terminal itself
esac

preempted=0
child=""
forward_stop() {
  preempted=1
  if [ -n "${child}" ]; then
    kill -TERM "${child}" 2>/dev/null || true
  fi
}
trap forward_stop TERM INT

"$@" &
child=$!

# A trapped signal interrupts `wait`; keep waiting until the child has really exited.
while true; do
  wait "${child}"
  status=$?
  kill -0 "${child}" 2>/dev/null || break
done

if [ "${preempted}" -eq 1 ]; then
  exit 75
fi
exit "${status}"
