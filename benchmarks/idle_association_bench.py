#!/usr/bin/env python3
"""CPU an idle DIMSE association costs: the node's waiting acceptor against pynetdicom's polling one.

pynetdicom's association and DUL threads each poll in a 1 ms loop, so an association that sits
idle (a modality keeping it open between studies) burns CPU; the node's acceptor
(scp_node.dimse.pynetdicom_internals: WakingRequestHandler) waits for an event instead.  This was a
timed unit test; CPU-tick counts flake on a loaded CI box, so it is measured here instead and
printed as a ratio against pynetdicom's own path measured in the same run.

usage: python benchmarks/idle_association_bench.py [--seconds 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]  # noqa: E402
from pynetdicom.transport import ThreadedAssociationServer  # noqa: E402

from scp_node.dimse.pynetdicom_internals import WakingRequestHandler  # noqa: E402


def _cpu_seconds(tid: int) -> float:
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(waking: bool, seconds: float) -> float:
    """CPU seconds per second that an idle association's two acceptor threads use."""
    ae = AE("UPPERLAYER")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    kwargs = {"request_handler": WakingRequestHandler} if waking else {}
    server = ae.make_server(("127.0.0.1", 0), server_class=ThreadedAssociationServer, **kwargs)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    ae._servers.append(server)  # as AE.start_server does (shutdown() removes it)
    try:
        req = AE("REQUESTOR")
        req.add_requested_context(Verification)
        assoc = req.associate("127.0.0.1", server.server_address[1], ae_title="UPPERLAYER")
        assert assoc.is_established
        time.sleep(0.2)
        (acceptor,) = server.active_associations
        tids = [acceptor.native_id, acceptor.dul.native_id]
        before = sum(_cpu_seconds(t) for t in tids)
        time.sleep(seconds)
        used = sum(_cpu_seconds(t) for t in tids) - before
        assoc.release()
        return used / seconds
    finally:
        server.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    polling = [idle_cpu(False, args.seconds) for _ in range(args.repeat)]
    waiting = [idle_cpu(True, args.seconds) for _ in range(args.repeat)]
    p, w = statistics.median(polling), statistics.median(waiting)
    print(f"idle association CPU, {args.repeat} x {args.seconds:g} s each (kernel ticks of 10 ms):")
    print(f"  pynetdicom polling : {p * 1000:6.1f} ms CPU per second  {[round(x * 1000, 1) for x in polling]}")
    print(f"  scp_node waiting   : {w * 1000:6.1f} ms CPU per second  {[round(x * 1000, 1) for x in waiting]}")
    print(f"  ratio (waiting / polling): {w / p:.3f}" if p else "  pynetdicom used no measurable CPU")


if __name__ == "__main__":
    main()
