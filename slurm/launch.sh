#!/usr/bin/env bash
# Shared SLURM launcher: `launch.sh RECIPE [hydra overrides...]`, exec'd by the batch scripts in
# this folder (see longrope_2048k.sh). It runs one srun task per node; each runs torchrun with
# GPUS_PER_NODE ranks, c10d rendezvous on the first node, and
#     python -m megarope recipe=RECIPE run.dir=$MEGAROPE_RUNS_DIR/RECIPE-$SLURM_JOB_ID overrides...
#
# Resume: SLURM_JOB_ID survives `scontrol requeue`, so a requeued job reuses the same run.dir and
# megarope resumes from its checkpoints (SLURM_RESTART_COUNT counts the requeues).
# Time limit: `#SBATCH --signal=B:USR1@300` makes SLURM signal this shell 300 s before the limit.
# The shell forwards SIGUSR1 to every rank (they write a checkpoint and exit), waits for the step,
# then requeues the job. `scancel --batch --signal=USR1 JOBID` does the same by hand.
#
# Environment knobs (all optional; sbatch exports the submitting shell's environment):
#   GPUS_PER_NODE      ranks per node (default: GPUs SLURM allocated per node, else 1)
#   MEGAROPE_RUNS_DIR  parent of run folders (default: $MEGAROPE_HOME/runs)
#   MEGAROPE_PYTHON    interpreter with torch and megarope (default: python3)
#   MEGAROPE_MODULE    module torchrun runs with -m (default: megarope; tests put a probe here)
#   MEGAROPE_HOME      checkout, put first on PYTHONPATH (default: the parent of this folder)
#   MEGAROPE_RDZV_PORT c10d rendezvous port on the first node (default: 29500)
#   MEGAROPE_MODULES   environment modules to `module load`, space-separated
#   MEGAROPE_SETUP     shell file sourced before launch (venv/conda activation, site settings)
#   MEGAROPE_CONTAINER container image for pyxis/enroot (srun --container-image); the checkout,
#                      the runs folder and the working directory are mounted at the same paths
#   MEGAROPE_CONTAINER_MOUNTS  extra pyxis mounts, comma-separated src:dst
#   MEGAROPE_SRUN_ARGS extra srun arguments, word-split (e.g. "--mpi=none --cpu-bind=none")
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds ranks get to checkpoint after the signal before
#                      torchrun kills them (default 120 here; older torch than 2.13: always 30)
#   NCCL_*, TORCH_NCCL_*, CUDA_*  exported variables reach every rank unchanged, e.g.
#                      NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5 NCCL_DEBUG=INFO
set -eo pipefail

recipe=${1:?usage: launch.sh RECIPE [overrides...] (inside an sbatch job)}
shift
: "${SLURM_JOB_ID:?launch.sh must run inside a SLURM job (sbatch slurm/$recipe.sh)}"

MEGAROPE_HOME=${MEGAROPE_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
runs_dir=${MEGAROPE_RUNS_DIR:-$MEGAROPE_HOME/runs}
run_dir=$runs_dir/$recipe-$SLURM_JOB_ID
mkdir -p "$run_dir"

if [[ -n ${MEGAROPE_MODULES:-} ]]; then
    # Non-login batch shells may lack the `module` function; /etc/profile defines it on most sites.
    # shellcheck source=/dev/null
    type module &>/dev/null || source /etc/profile
    # shellcheck disable=SC2086  # a list of module names
    module load $MEGAROPE_MODULES
fi
if [[ -n ${MEGAROPE_SETUP:-} ]]; then
    # shellcheck source=/dev/null
    source "$MEGAROPE_SETUP"
fi

export PYTHONPATH=$MEGAROPE_HOME${PYTHONPATH:+:$PYTHONPATH}
# torchrun's agent dies on SIGUSR1 unless told to catch it and pass it on to its ranks: this is
# the env form of its --signals-to-handle (torch >= 2.9). Setting TORCHELASTIC_SIGNALS_TO_HANDLE
# is useless, torchrun overwrites it with this option's value.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

# Rendezvous at the first node's address as SLURM knows it (node names need not resolve).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
rdzv_host=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
rdzv_port=${MEGAROPE_RDZV_PORT:-29500}
gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

read -ra srun_extra <<< "${MEGAROPE_SRUN_ARGS:-}"
container_args=()
if [[ -n ${MEGAROPE_CONTAINER:-} ]]; then
    mounts=$MEGAROPE_HOME:$MEGAROPE_HOME,$runs_dir:$runs_dir,$PWD:$PWD
    mounts+=${MEGAROPE_CONTAINER_MOUNTS:+,$MEGAROPE_CONTAINER_MOUNTS}
    container_args=(--container-image="$MEGAROPE_CONTAINER" --container-mounts="$mounts"
                    --container-workdir="$PWD")
fi

cmd=(srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1
     --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"
     # A rank that died leaves the others blocked in collectives: end them 5 minutes after the
     # first node's task exits, long enough for the rest to finish an emergency checkpoint.
     --wait=300
     "${container_args[@]}" "${srun_extra[@]}"
     "${MEGAROPE_PYTHON:-python3}" -m torch.distributed.run
     --nnodes="$SLURM_NNODES" --nproc-per-node="$gpus_per_node"
     --rdzv-backend=c10d --rdzv-endpoint="$rdzv_host:$rdzv_port" --rdzv-id="$SLURM_JOB_ID"
     -m "${MEGAROPE_MODULE:-megarope}" recipe="$recipe" run.dir="$run_dir" "$@")

echo "launch.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST," \
     "$SLURM_NNODES node(s) x $gpus_per_node rank(s), run.dir=$run_dir"
echo "launch.sh: ${cmd[*]}"

signalled=0
# shellcheck disable=SC2317  # only reached through the trap
on_usr1() {
    signalled=1
    echo "launch.sh: SIGUSR1 received, forwarding to the ranks to checkpoint and stop"
    # srun has every process of its tasks signalled: the torchrun agents, which pass it on, and
    # their ranks, which therefore may see it twice.
    kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap on_usr1 USR1

"${cmd[@]}" &
srun_pid=$!
# `wait` returns early whenever a trapped signal arrives: keep waiting until srun has exited.
status=0
wait "$srun_pid" || status=$?
while kill -0 "$srun_pid" 2>/dev/null; do
    status=0
    wait "$srun_pid" || status=$?
done

if ((signalled)); then
    echo "launch.sh: step exited with $status after SIGUSR1; requeueing job $SLURM_JOB_ID"
    # SLURM ends this script and queues the job again with the same id, hence the same run.dir.
    scontrol requeue "$SLURM_JOB_ID"
    exit "$status"
fi
echo "launch.sh: step exited with $status"
exit "$status"
