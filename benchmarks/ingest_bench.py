"""Ingest throughput: the 133-slice CT from several concurrent DCMTK ``storescu`` senders to
scp_node, Orthanc and DCMTK ``storescp``, in one run on one machine.

Each sender gets its own copy of the series with new Study/Series/SOP Instance UIDs (rewritten
with pydicom into a temp folder first), so every receiver stores new data.  ``TCP_NODELAY=1`` is
set for every DCMTK process and Orthanc.  Prints instances/s and MB/s per receiver, the ratios,
the CPU time per instance, and the memory (RSS, scp_node's receiver processes included) before and
after; writes the figures to
``test-artifacts/ingest-bench.json``.

    python benchmarks/ingest_bench.py [--senders 4] [--rounds 1] [--repeat 1] [--only scp_node,orthanc,storescp]
                                      [--association-per-instance] [--fsync-delay-us N]
                                      [--database sqlite|postgresql] [--receivers N]

``--rounds N`` sends N series per sender per receiver (memory over many instances: 4 senders x
19 rounds x 133 = 10,108 instances).  scp_node runs as ``scp-node serve`` with the tiny test
model and a series window long enough that no analysis runs during the measurement: this is
the receive path, durable (fsync) and indexed (SQLite, synchronous=FULL).

``--database postgresql`` puts scp_node's index on PostgreSQL: a throw-away cluster (Debian's
``postgresql`` binaries, ``initdb`` + ``pg_ctl`` on a free port, as the tests' helper starts it)
but durable -- fsync, synchronous_commit and full_page_writes on, as a production server runs --
with a fresh database for each scp_node run, on the same disk as everything else.

``--receivers N`` (with ``--database postgresql``) runs scp_node as N ``serve --role receiver``
processes, each with its own config, port and run-time folder, sharing that one index, one
storage folder and one audit key, as a scale-out deployment does; the senders are dealt out to
them in turn.  Its CPU and memory figures are those of all N together.

``--fsync-delay-us N`` stands in for a slower disk than the one the benchmark runs on: a small
``LD_PRELOAD`` library (``benchmarks/fsync_delay.c``, built with ``cc``) makes every ``fsync`` and
``fdatasync`` of scp_node and Orthanc (and of SQLite inside them) return N microseconds later.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.net import free_port, wait_port  # noqa: E402
from tests.support.node import cli, start_node, write_config  # noqa: E402
from tests.support.orthanc import start_orthanc  # noqa: E402
from tests.support.paths import CT_DIR  # noqa: E402
from tests.support.postgres import PostgresServer, _bin_dir, _run  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")


def rewrite_copies(files: list[Path], out: Path, copies: int) -> list[list[Path]]:
    """``copies`` copies of the series, each with new UIDs."""
    from tests.faults.helpers import copy_series

    return [copy_series(files, out / f"copy{c:03d}") for c in range(copies)]


def tree(pid: int) -> list[int]:
    """``pid`` and its live children (scp_node's receiver processes)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory (current and peak) summed over the process and its children."""
    out = {"VmRSS": 0.0, "VmHWM": 0.0}
    for p in tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key = line.split(":")[0]
                out[key] = round(out[key] + int(line.split()[1]) / 1024, 1)
    return out


def slow_fsync(delay_us: int, work: Path) -> None:
    """Build the fsync delay library and set it for every process started from now on (the
    receivers; the senders' environment, ``ENV``, was taken before)."""
    lib = work / "fsync_delay.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(Path(__file__).with_name("fsync_delay.c")),
                    "-ldl"], check=True)
    os.environ["LD_PRELOAD"] = str(lib)
    os.environ["FSYNC_DELAY_US"] = str(delay_us)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds so far of a process and its live children (from /proc)."""
    user = system = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        u, s_, cu, cs = (int(f) / os.sysconf("SC_CLK_TCK") for f in fields[11:15])
        user, system = user + u + cu, system + s_ + cs
    return user, system


def send_all(ports: list[int], aec: str, batches: list[list[list[Path]]], per_instance: bool = False) -> float:
    """One storescu per sender, all at once; each sender sends its batches in one association each
    (as a modality sends a series); return the wall time until every sender is done.  Sender i
    sends to ``ports[i % len(ports)]`` (several receivers of one scale-out index).

    ``per_instance``: each sender runs one storescu per file instead (one association per image,
    as many CR/DX modalities do), so association set-up is part of every instance's cost."""
    def sender(port: int, files: list[str], errors: list[str]) -> None:
        for f in files:
            r = subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), f],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
            if r.returncode != 0:
                errors.append(r.stdout.decode(errors="replace")[-2000:])

    start = time.perf_counter()
    if per_instance:
        errors: list[str] = []
        threads = [threading.Thread(target=sender, args=(ports[i % len(ports)], [str(p) for b in sb for p in b], errors))
                   for i, sb in enumerate(batches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"storescu failed: {errors[0]}")
        return time.perf_counter() - start
    procs = []
    for i, sender_batches in enumerate(batches):
        files = [str(p) for batch in sender_batches for p in batch]
        port = ports[i % len(ports)]
        procs.append(subprocess.Popen(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port),
                                       *files], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV))
    outs = [(p.wait(), p.stdout.read().decode(errors="replace") if p.stdout else "") for p in procs]
    elapsed = time.perf_counter() - start
    for rc, out in outs:
        if rc != 0:
            raise RuntimeError(f"storescu failed ({rc}): {out[-2000:]}")
    return elapsed


def start_durable_postgres() -> PostgresServer:
    """A throw-away cluster like tests/support/postgres.py's, with PostgreSQL's durable defaults
    (the tests' cluster turns fsync off; a benchmark must not)."""
    import pwd

    bin_dir = _bin_dir()
    if bin_dir is None:
        raise SystemExit("--database postgresql: PostgreSQL is not installed (apt-get install postgresql)")
    user = None
    if os.geteuid() == 0:  # initdb will not run as root
        pwd.getpwnam("postgres")
        user = "postgres"
    folder = Path(tempfile.mkdtemp(prefix="ingest-bench-pg-"))  # (its own: the postgres user must reach it)
    if user is not None:
        shutil.chown(folder, user)
    port = free_port()
    _run(bin_dir / "initdb", ["-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8"], user,
         cwd=folder)
    opts = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
    _run(bin_dir / "pg_ctl", ["-D", str(folder / "data"), "-o", opts, "-l", str(folder / "server.log"),
                              "-w", "-t", "60", "start"], user, cwd=folder)
    return PostgresServer(url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", _folder=folder,
                          _bin=bin_dir, _user=user)


#: What a receiver's starter returns: its port(s), called AE title, stop, and the pid(s) to measure.
Started = tuple[list[int], str, Callable[[], None], list[int]]


def _summed(pids: list[int], measure: Callable[[int], dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for pid in pids:
        for key, value in measure(pid).items():
            total[key] = round(total.get(key, 0.0) + value, 1)
    return total


def _cpu(pids: list[int]) -> tuple[float, float]:
    times = [cpu_seconds(p) for p in pids]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def run_target(name: str, start: Callable[[], Started],
               batches: list[list[list[Path]]], n: int, size: int, per_instance: bool = False) -> dict[str, object]:
    ports, aec, stop, pids = start()
    pid = bool(pids)
    try:
        before = _summed(pids, rss_mib)
        cpu0 = _cpu(pids)
        seconds = send_all(ports, aec, batches, per_instance)
        cpu1 = _cpu(pids)
        user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        after = _summed(pids, rss_mib)
    finally:
        stop()
    row: dict[str, object] = {"instances": n, "seconds": round(seconds, 2), "instances_per_s": round(n / seconds, 1),
                              "mb_per_s": round(size / seconds / 1e6, 1)}
    if pid:
        row["rss_before_mib"], row["rss_after_mib"] = before.get("VmRSS"), after.get("VmRSS")
        row["rss_peak_mib"] = after.get("VmHWM")
        row["cpu_ms_per_instance"] = round((user + system) * 1000 / n, 2)
        row["cpu_user_ms_per_instance"] = round(user * 1000 / n, 2)
    print(f"{name:9s} {n:6d} instances in {seconds:7.2f} s: {row['instances_per_s']:7.1f} inst/s "
          f"{row['mb_per_s']:6.1f} MB/s" + (f"  CPU {row['cpu_ms_per_instance']} ms/inst ({row['cpu_user_ms_per_instance']} user)  RSS {row['rss_before_mib']} -> {row['rss_after_mib']} MiB "
                                             f"(peak {row['rss_peak_mib']})" if pid else ""), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every receiver N times, alternating, and report medians (this box varies by 15-20%%)")
    ap.add_argument("--only", default="scp_node,orthanc,storescp")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--association-per-instance", action="store_true",
                    help="one storescu (one association) per file, as many CR/DX modalities send")
    ap.add_argument("--profile", type=Path, help="py-spy (collapsed stacks) of scp_node while it receives")
    ap.add_argument("--fsync-delay-us", type=int, default=0,
                    help="make every fsync of the receivers N microseconds slower (a slower disk)")
    ap.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                    help="scp_node's index (postgresql: a throw-away durable cluster started here)")
    ap.add_argument("--receivers", type=int, default=1,
                    help="scp_node as N 'serve --role receiver' processes on one index (needs --database postgresql)")
    args = ap.parse_args()
    if args.receivers > 1 and args.database != "postgresql":
        ap.error("--receivers > 1 needs --database postgresql (SQLite serves one node)")
    targets = args.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    postgres: PostgresServer | None = None
    try:
        if args.database == "postgresql" and "scp_node" in targets:
            postgres = start_durable_postgres()
        files = sorted(CT_DIR.glob("*.dcm"))
        copies = rewrite_copies(files, work / "data", args.senders * args.rounds)
        if args.fsync_delay_us:
            slow_fsync(args.fsync_delay_us, work)
        batches = [copies[s * args.rounds:(s + 1) * args.rounds] for s in range(args.senders)]
        n = sum(len(b) for sb in batches for b in sb)
        size = sum(p.stat().st_size for sb in batches for b in sb for p in b)
        print(f"{args.senders} concurrent storescu senders x {args.rounds} series x {len(files)} slices = {n} "
              f"instances, {size / 1e6:.0f} MB; cpus {os.cpu_count()}; scp_node's index on {args.database}"
              + (f", {args.receivers} receivers" if args.receivers > 1 else ""),
              flush=True)
        results: dict[str, dict[str, object]] = {}

        def scp_node() -> Started:
            model = work / "model"
            if not model.exists():
                r = cli("make-test-model", str(model))
                assert r.returncode == 0, r.stderr
            url = postgres.database_url() if postgres is not None else ""
            nodes = []
            try:
                for i in range(args.receivers):
                    nodes.append(_scp_node_process(work / f"scp_node-{rep}", i, model, url, args.receivers))
            except BaseException:
                for node in nodes:
                    node.stop()
                raise
            spy = None
            if args.profile:
                spy = subprocess.Popen(["py-spy", "record", "-p", str(nodes[0].proc.pid), "-r", "250", "--gil", "--threads", "--subprocesses",
                                        "--format", "raw", "-o", str(args.profile), "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)

            def stop() -> None:
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(timeout=60)
                for node in nodes:
                    node.stop()
            return [node.port for node in nodes], "SCPNODE", stop, [node.proc.pid for node in nodes]

        def orthanc() -> Started:
            o = start_orthanc(work / f"orthanc-{rep}", {})
            return [o.dicom_port], "ORTHANC", o.stop, [o.proc.pid]

        def storescp() -> Started:
            out = work / f"storescp-{rep}"
            out.mkdir()
            port = free_port()
            p = subprocess.Popen(["/usr/bin/storescp", "--fork", "-od", str(out), str(port)], env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(port, 30)

            def stop() -> None:
                p.terminate()
                p.wait(timeout=20)
            return [port], "STORESCP", stop, []

        starters = {"scp_node": scp_node, "orthanc": orthanc, "storescp": storescp}
        runs: dict[str, list[dict[str, object]]] = {t: [] for t in targets}
        ratios: dict[str, list[float]] = {}
        for rep in range(args.repeat):
            if args.repeat > 1:
                print(f"-- run {rep + 1} of {args.repeat}", flush=True)
            for t in targets:
                runs[t].append(run_target(t, starters[t], batches, n, size, args.association_per_instance))
            for other in ("orthanc", "storescp"):
                if "scp_node" in targets and other in targets:
                    ratio = float(runs["scp_node"][-1]["instances_per_s"]) / float(runs[other][-1]["instances_per_s"])
                    ratios.setdefault(other, []).append(ratio)
                    print(f"scp_node / {other}: {ratio:.2f}x", flush=True)
        for t in targets:  # the median run of each receiver (by rate), with every run kept
            ordered = sorted(runs[t], key=lambda r: float(r["instances_per_s"]))  # type: ignore[arg-type]
            results[t] = dict(ordered[len(ordered) // 2], runs=runs[t])
        for other, values in ratios.items():
            results["scp_node"][f"ratio_vs_{other}"] = round(statistics.median(values), 2)
            results["scp_node"][f"ratios_vs_{other}"] = [round(v, 2) for v in values]
            if args.repeat > 1:
                print(f"scp_node / {other} over {len(values)} paired runs: median {statistics.median(values):.2f}x "
                      f"(range {min(values):.2f}-{max(values):.2f})")
        out = REPO / "test-artifacts" / "ingest-bench.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"database": args.database, "receivers": args.receivers, "senders": args.senders, "rounds": args.rounds, "repeat": args.repeat, "fsync_delay_us": args.fsync_delay_us, "instances": n,
                                   "association_per_instance": args.association_per_instance,
                                   "megabytes": round(size / 1e6), "cpus": os.cpu_count(), "results": results},
                                  indent=2) + "\n")
        print(f"written {out.relative_to(REPO)}")
    finally:
        if postgres is not None:
            postgres.stop()  # and its folder removed
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _scp_node_process(root: Path, i: int, model: Path, database_url: str, receivers: int) -> Any:
    """scp_node receiver ``i`` of ``receivers`` in ``root``: ``serve`` with the tiny test model and
    a series window long enough that no analysis runs while it receives.  One receiver is the
    whole node on its own index (SQLite, or ``database_url``); several are ``--role receiver``
    processes with their own config, port and run-time folder, sharing ``database_url``, one
    storage folder and one audit key (as ``tests/integration/test_scale_out.py`` sets them up)."""
    folder = root / f"receiver-{i}"
    folder.mkdir(parents=True)
    port = free_port()
    config = write_config(folder, model_dir=model, port=port, stable_seconds=36000,
                          peers=[("STORESCU", "127.0.0.1")])
    if database_url:
        body = config.read_text().replace(f'database_url = "sqlite:///{folder}/index.db"',
                                          f'database_url = "{database_url}"')
        if receivers > 1:
            body = body.replace(f'storage_dir = "{folder}/storage"',
                                f'storage_dir = "{root}/storage"\nvar_dir = "{folder}/var"')
            body = body.replace(f'secret_file = "{folder}/audit.key"', f'secret_file = "{root}/audit.key"')
        config.write_text(body)
    return start_node(config, port, timeout=300, role="receiver" if receivers > 1 else None)


if __name__ == "__main__":
    main()
