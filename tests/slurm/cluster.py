"""A throwaway SLURM cluster on this host, for tests: real Debian slurmctld/slurmd/munged.

Everything runs in a private network namespace that has only a loopback interface, so no daemon
is reachable from outside the host (slurmctld and slurmd bind every address of their namespace),
and a private mount namespace where this cluster's config folder is bind-mounted on /etc/slurm:
jobs' nested `srun` (whose environment the executor's jobstep strips of SLURM_CONF) finds it
there, and the host's /etc/slurm is left alone.
One slurmd per node definition (`slurmd -N NAME`, each on its own port) stands in for the nodes;
their features and (fake, File=/dev/null) GPUs let the scheduler place jobs as on a real cluster:

    node  features  gres             partition                    CPUs
    cpu1  cpu       -                cpu                          4
    ada1  sm_89     gpu:rtx4090:1    gpu (the default partition)  2
    hop1  sm_90     gpu:h100:1       gpu                          2

No accounting database: jobs are looked up with `scontrol -d` (MinJobAge keeps finished jobs for
an hour; JOB_GRES there is the GPUs a job was given) and every finished job is also written by
jobcomp/filetxt. The executor plugin is told to use
squeue for job status (its sacct default needs slurmdbd).

    python tests/slurm/cluster.py DIR -- COMMAND...   # start, run COMMAND inside, stop
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun", "scancel", "unshare",
            "nsenter", "mount", "ip")
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "install-slurm.sh"


@dataclass(frozen=True)
class Node:
    name: str
    features: tuple[str, ...]
    partition: str
    gpu_type: str | None = None
    cpus: int = 2


NODES = (
    Node("cpu1", ("cpu",), "cpu", cpus=4),  # two 2-thread jobs at once (the host has fewer cores: fine here)
    Node("ada1", ("sm_89",), "gpu", "rtx4090"),
    Node("hop1", ("sm_90",), "gpu", "h100"),
)


WORKFLOW_PARTS = ("Snakefile", "rules", "scripts", "kiln", "schemas", "envs", "profiles", "report", "config.yaml")


def copy_workflow(dest: Path) -> Path:
    """A copy of the workflow (Snakefile, rules, scripts, the kiln package ...) to run tests from:
    files edited while a test runs then change neither its code fingerprints nor its script mtimes."""
    repo = Path(__file__).resolve().parents[2]
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = repo / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, dest / part)
    return dest


def which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def ensure_installed(timeout: float = 420) -> str | None:
    """Install the Debian packages when missing (root only, bounded); the reason it cannot, or None."""
    if not missing():
        return None
    if os.geteuid() != 0 or not which("apt-get"):
        return f"SLURM is not installed ({', '.join(missing())} missing) and this user cannot apt-get it"
    try:
        proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{INSTALL_SCRIPT} did not finish in {timeout:.0f} s"
    if proc.returncode != 0 or missing():
        return f"{INSTALL_SCRIPT} failed (rc {proc.returncode}): {(proc.stdout + proc.stderr)[-500:]}"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def parse_record(line: str) -> dict[str, str]:
    """`scontrol -o show job` / jobcomp line -> {key: value} (values hold no spaces in these fields)."""
    out = {}
    for token in line.split():
        if "=" in token:
            k, v = token.split("=", 1)
            out.setdefault(k, v)
    return out


class LoopbackSlurm:
    """Start with start(), run clients with run(), always stop()."""

    def __init__(self, root: Path, mem_mb: int = 32000):
        self.root = Path(root)
        self.mem_mb = mem_mb
        self.netns_holder: subprocess.Popen | None = None
        self.etc = self.root / "etc"  # bind-mounted on /etc/slurm inside the namespaces
        self.conf = self.etc / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"
        self.jobcomp = self.root / "log" / "jobcomp.txt"

    # ------------------------------------------------------------------ lifecycle

    def _in_ns(self, cwd: str | Path | None = None) -> list[str]:
        """nsenter into the cluster's namespaces, then cd to `cwd` (default: this process's).

        Entering a mount namespace resets the working folder. nsenter's own --wd opens the folder
        before it enters, so relative paths would then resolve through the outer namespace's
        mount and renames between relative and absolute paths fail with EXDEV: cd inside instead.
        """
        pid = self.netns_holder.pid
        cwd = str(Path(cwd or os.getcwd()).resolve())
        return [which("nsenter"), f"--net=/proc/{pid}/ns/net", f"--mount=/proc/{pid}/ns/mnt", "--",
                "/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd]

    def env(self) -> dict[str, str]:
        """The caller's environment without SLURM_CONF: inside the namespaces it is /etc/slurm/slurm.conf."""
        return {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port, slurmd_port, *node_ports = _free_ports(2 + len(NODES))
        r = self.root
        for d in ("etc", "state", "log", "munge", *(f"spool/{n.name}" for n in NODES)):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o755)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        lines = [
            "ClusterName=kilntest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in a container: plain process tracking, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "GresTypes=gpu",
            "MpiDefault=none",
            "ReturnToService=2",
            # The nodes share this host: let each claim the configured CPUs and memory.
            "SlurmdParameters=config_overrides",
            "MinJobAge=3600",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
        ]
        for node, port in zip(NODES, node_ports):
            gres = f" Gres=gpu:{node.gpu_type}:1" if node.gpu_type else ""
            lines.append(
                f"NodeName={node.name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={node.cpus} "
                f"RealMemory={self.mem_mb} Feature={','.join(node.features)}{gres} State=UNKNOWN"
            )
        for part in sorted({n.partition for n in NODES}):
            nodes = ",".join(n.name for n in NODES if n.partition == part)
            default = "YES" if part == "gpu" else "NO"
            lines.append(f"PartitionName={part} Nodes={nodes} Default={default} MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (self.etc / "gres.conf").write_text(
            "".join(f"NodeName={n.name} Name=gpu Type={n.gpu_type} File=/dev/null\n" for n in NODES if n.gpu_type)
        )

    def _daemon(self, *cmd: str) -> None:
        proc = subprocess.run([*self._in_ns(), *cmd], capture_output=True, text=True, timeout=30, env=self.env())
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}{self.logs()}")

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        if not Path("/etc/slurm").is_dir():
            raise RuntimeError("/etc/slurm is missing (the slurm packages create it)")
        # Network and mount namespaces of their own, held open by a sleeping process.
        self.netns_holder = subprocess.Popen(
            [which("unshare"), "--net", "--mount", "--propagation", "private", "--", "sleep", "infinity"]
        )
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{self.netns_holder.pid}/ns/net").exists() or os.readlink(
            f"/proc/{self.netns_holder.pid}/ns/net"
        ) == os.readlink("/proc/self/ns/net"):
            if time.monotonic() > deadline or self.netns_holder.poll() is not None:
                raise RuntimeError("unshare --net did not give a network namespace")
            time.sleep(0.05)
        self._daemon(which("mount"), "--bind", str(self.etc), "/etc/slurm")
        self._daemon(which("ip"), "link", "set", "lo", "up")
        # glibc's AI_ADDRCONFIG (which Slurm asks for) resolves nothing where the only addresses are
        # loopback ones: give lo a private address too. It still leads nowhere outside the namespace.
        self._daemon(which("ip"), "addr", "add", "10.254.254.1/32", "dev", "lo")
        r = self.root
        self._daemon(which("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={r}/munge.key",
                     f"--log-file={r}/munge/munged.log", f"--pid-file={r}/munge/munged.pid",
                     f"--seed-file={r}/munge/seed")
        self._daemon(which("slurmctld"))
        for node in NODES:
            self._daemon(which("slurmd"), "-N", node.name)
        deadline = time.monotonic() + timeout
        while True:
            if not self._alive(r / "slurmctld.pid"):
                raise RuntimeError(f"slurmctld stopped\n{self.logs()}")
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=30).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(NODES) and all(s == "idle" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM nodes not idle after {timeout:.0f} s: {states}\n{self.logs()}")
            time.sleep(0.5)

    @staticmethod
    def _alive(pidfile: Path) -> bool:
        try:
            return Path(f"/proc/{int(pidfile.read_text().split()[0])}").exists()
        except (OSError, ValueError, IndexError):
            return False

    def stop(self) -> None:
        """Cancel this cluster's jobs, stop its daemons (by their pid files) and the namespace."""
        if self.netns_holder is None:
            return
        r = self.root
        try:
            self.run(["scancel", "--full", "--user", str(os.getuid())], timeout=10)
        except Exception:  # noqa: BLE001 - best effort: the daemons go next anyway
            pass
        pidfiles = [r / "slurmctld.pid", *(r / f"slurmd-{n.name}.pid" for n in NODES), r / "munge" / "munged.pid"]
        pids = []
        for f in pidfiles:
            try:
                pids.append(int(f.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        for pid in pids:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        self.netns_holder.terminate()
        self.netns_holder.wait(timeout=10)
        self.netns_holder = None

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ clients and records

    def run(self, cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, snakemake ...) inside the cluster's network namespace."""
        cwd = kw.pop("cwd", None)
        return subprocess.run([*self._in_ns(cwd), *cmd], capture_output=True, text=True, timeout=timeout,
                              env=kw.pop("env", None) or self.env(), **kw)

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones included, MinJobAge=3600), with `scontrol -d`
        fields: Comment (the executor's rule_NAME_wildcards_VALUES), Partition, Features (the
        constraint asked for), NodeList, TresPerJob (GPUs asked for), JOB_GRES (GPUs given), JobState."""
        out = self.run(["scontrol", "-d", "-o", "show", "job"], timeout=30)
        if "No jobs in the system" in out.stdout + out.stderr:
            return []
        out.check_returncode()
        return [parse_record(line) for line in out.stdout.splitlines() if line.startswith("JobId=")]

    def completed(self) -> list[dict[str, str]]:
        """jobcomp/filetxt's record of every finished job (JobId, JobState, Partition, NodeList, Tres)."""
        if not self.jobcomp.exists():
            return []
        return [parse_record(line) for line in self.jobcomp.read_text().splitlines() if line.strip()]

    def nodes(self) -> dict[str, dict[str, str]]:
        out = self.run(["scontrol", "-o", "show", "node"], timeout=30)
        out.check_returncode()
        return {r["NodeName"]: r for r in map(parse_record, out.stdout.splitlines()) if "NodeName" in r}

    def logs(self) -> str:
        text = []
        for f in sorted((self.root / "log").glob("*.log")):
            text.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(text)


def main(argv: list[str]) -> int:
    if "--" not in argv or len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    root, cmd = Path(argv[0]), argv[argv.index("--") + 1 :]
    reason = ensure_installed()
    if reason:
        print(f"cluster: {reason}", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    with LoopbackSlurm(root) as cluster:
        print(f"cluster: up in {root}; running {shlex.join(cmd)}", file=sys.stderr)
        proc = subprocess.run([*cluster._in_ns(), *cmd], env=cluster.env())
        for job in cluster.jobs():
            print(job.get("JobId"), job.get("JobState"), job.get("Partition"), job.get("NodeList"),
                  job.get("Features"), job.get("JOB_GRES"), job.get("Comment"))
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
