"""ddplaunch's command line: the click declarations, then one call to launcher.job.run_command.

Each option's meaning lives in launcher/: launcher.options (the parsed values and their small
parsers), launcher.decide (what they mean on this machine), launcher.job (running it).
"""

from __future__ import annotations

import os
import sys

import click

from launcher import __version__
from launcher.options import DEFAULT_GRACE_S, DEFAULT_JOIN_TIMEOUT_S, Options

CONTEXT = {
    "allow_interspersed_args": False,  # everything after SCRIPT belongs to the script
    "help_option_names": ["-h", "--help"],
    "max_content_width": 100,
}


@click.command(context_settings=CONTEXT)
@click.option("--nproc", "--nproc-per-node", "--nproc_per_node", "nproc", envvar="PET_NPROC_PER_NODE",
              metavar="N|auto|gpu|cpu",
              help="Workers on this node: a number, auto (GPUs, else CPUs), gpu or cpu. "
                   "Default: the number of --gpu-ids, else 1.")
@click.option("--nnodes", envvar="PET_NNODES", metavar="N",
              help="Number of nodes in the job. Default: from Slurm (srun) or Open MPI (mpirun) "
                   "when run under them, else 1.")
@click.option("--node-rank", "--node_rank", "node_rank", envvar="PET_NODE_RANK", type=int, metavar="R",
              help="This node's rank, 0..nnodes-1. Default: 0 on one node; across nodes, the order "
                   "in which nodes join (the node that owns --master-addr is 0).")
@click.option("--master-addr", "--master_addr", "master_addr", envvar="PET_MASTER_ADDR", metavar="HOST",
              help="Address of node 0, where rank 0 hosts the rendezvous. Default on one node: 127.0.0.1.")
@click.option("--master-port", "--master_port", "master_port", envvar="PET_MASTER_PORT", type=int,
              metavar="PORT", help="Rendezvous port. Default: a free port on one node, 29500 across nodes.")
@click.option("--rdzv-endpoint", "--rdzv_endpoint", "rdzv_endpoint", envvar="PET_RDZV_ENDPOINT",
              metavar="HOST[:PORT]", help="torchrun's spelling of --master-addr and --master-port.")
@click.option("--rdzv-backend", "--rdzv_backend", "rdzv_backend", envvar="PET_RDZV_BACKEND",
              type=click.Choice(["static", "c10d"]), hidden=True,
              help="Accepted for torchrun command lines; nodes always meet at node 0's TCPStore.")
@click.option("--join-timeout", "--join_timeout", "join_timeout", type=float, default=DEFAULT_JOIN_TIMEOUT_S,
              show_default=True, metavar="SECONDS", help="Across nodes: how long to wait for every node to join.")
@click.option("--standalone", is_flag=True, envvar="PET_STANDALONE",
              help="One node with a free port (accepted as in torchrun; that is the default here).")
@click.option("--gpu-ids", "--gpu_ids", "gpu_ids", metavar="IDS",
              help="GPUs to use, e.g. 0,2,4,6: one worker each; every worker sees them all as "
                   "CUDA_VISIBLE_DEVICES and LOCAL_RANK i uses cuda:i.")
@click.option("-m", "--module", is_flag=True, help="Run SCRIPT as a Python module (python -m).")
@click.option("--no-python", "--no_python", "no_python", is_flag=True,
              help="Run SCRIPT as an executable, not through Python.")
@click.option("--local-rank-arg", "--local_rank_arg", "local_rank_arg", is_flag=True,
              help="Also pass --local-rank=N to the script, for torch.distributed.launch-era scripts.")
@click.option("--log-dir", "--log_dir", "log_dir", envvar="PET_LOG_DIR", metavar="DIR",
              help="Write rankN.log (raw lines) per rank and launcher.log (events) here.")
@click.option("--ranks", metavar="LIST",
              help="Only these global ranks reach the terminal, e.g. 0 or 0,3 or 0-3 (files get all).")
@click.option("--max-restarts", "--max_restarts", "max_restarts", envvar="PET_MAX_RESTARTS", type=int,
              default=0, show_default=True, metavar="N",
              help="On a failure, stop all workers and start them all again, up to N times.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Extra environment for the workers (repeatable).")
@click.option("--dry-run", "--dry_run", "dry_run", is_flag=True, help="Print the plan and exit, starting nothing.")
@click.option("--grace", type=float, default=DEFAULT_GRACE_S, show_default=True, metavar="SECONDS",
              help="At teardown, time between SIGTERM and SIGKILL.")
@click.option("--run-id", "--run_id", "--rdzv-id", "--rdzv_id", "run_id", envvar="PET_RDZV_ID", metavar="ID",
              help="TORCHELASTIC_RUN_ID for the workers. Default: a fresh random id.")
@click.option("--no-color", "--no_color", "no_color", is_flag=True, help="No colour (also: NO_COLOR=1).")
@click.option("--hosts", "-H", "hosts", metavar="H1,H2,...",
              help="Start the job on these hosts over SSH, node rank in this order; entries may be "
                   "user@host:port and names from ~/.ssh/config.")
@click.option("--hostfile", metavar="FILE",
              help="Hosts in the DeepSpeed/MPI format: `node1 slots=4`, optional `gpus=0,1,2,3`, # comments.")
@click.option("--ssh-accept-new-host-keys", "ssh_accept_new_host_keys", is_flag=True,
              help="Trust and remember a host key seen for the first time (OpenSSH's accept-new). "
                   "A changed key is always refused.")
@click.option("--chdir", metavar="DIR", help="With --hosts: the working directory on every host. Default: this one.")
@click.option("--python", "python", metavar="PATH",
              help="With --hosts: the Python on every host. Default: the one running ddplaunch here.")
@click.option("--stdin", "stdin", default="0", show_default=True, metavar="RANK|none",
              help="The global rank that reads ddplaunch's stdin (pdb at a breakpoint works); the "
                   "other ranks read /dev/null, as under mpirun. none: every rank reads /dev/null.")
@click.option("--agent", is_flag=True, hidden=True, help="Internal: run as a node agent for a head over SSH.")
@click.option("--host-name", "host_name", hidden=True, help="Internal: this host's name as the head knows it.")
@click.version_option(__version__, "-V", "--version", prog_name="ddplaunch")
@click.argument("script", metavar="SCRIPT")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED, metavar="[SCRIPT_ARGS]...")
def command(**params: object) -> None:
    """Launch SCRIPT as a PyTorch distributed job with torchrun's environment.

    \b
    Examples:
      ddplaunch --nproc 8 train.py --lr 0.1
      ddplaunch --gpu-ids 0,2,4,6 train.py
      ddplaunch --nproc 2 --dry-run train.py
    """
    from launcher.job import run_command

    code = run_command(Options(**params))  # type: ignore[arg-type]
    if "torch" in sys.modules:
        # A multi-node agent imported torch for its store; the interpreter's teardown of torch
        # costs ~0.5 s and every resource of ours is already released.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main() -> None:
    command.main(prog_name="ddplaunch")


if __name__ == "__main__":
    main()
