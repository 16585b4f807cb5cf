"""A real syslog receiver for the ATNA tests: Debian's rsyslogd with a TLS listener (imtcp + the
gtls stream driver, RFC 5425), requiring a client certificate from the test CA, writing each
message it receives (``%rawmsg%``: the RFC 5424 message as sent) to one line of a file."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .net import free_port, wait_port
from .paths import IN_CI


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(folder: Path) -> Certs:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def write_key(k: rsa.RSAPrivateKey, name: str) -> Path:
        path = folder / name
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scp-node test ATNA CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        k = key()
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_name).public_key(k.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert, k

    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    server, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    client, client_key = leaf("scp-node", ExtendedKeyUsageOID.CLIENT_AUTH)
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    (folder / "client.pem").write_bytes(client.public_bytes(pem))
    return Certs(folder / "ca.pem", folder / "server.pem", write_key(server_key, "server.key"),
                 folder / "client.pem", write_key(client_key, "client.key"))


def rsyslogd() -> str:
    for candidate in ("/usr/sbin/rsyslogd", shutil.which("rsyslogd")):
        if candidate and Path(candidate).exists():
            if not list(Path("/usr/lib/x86_64-linux-gnu/rsyslog").glob("lmnsd_gtls.so")) and \
                    not list(Path("/usr/lib").rglob("lmnsd_gtls.so")):
                break
            return candidate
    msg = "rsyslogd with the gtls driver missing (apt-get install rsyslog rsyslog-gnutls; .ci/run installs them)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)
    raise AssertionError


@dataclass
class Rsyslog:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    log: Path

    def lines(self) -> list[str]:
        try:
            return [ln for ln in self.out.read_text(encoding="utf-8").split("\n") if ln]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_rsyslog(folder: Path, certs: Certs) -> Rsyslog:
    """rsyslogd in the foreground on a free loopback port: TLS only, client certificate required."""
    exe = rsyslogd()
    folder.mkdir(parents=True, exist_ok=True)
    work = folder / "work"
    work.mkdir(exist_ok=True)
    port = free_port()
    out = folder / "received.log"
    conf = folder / "rsyslog.conf"
    conf.write_text(f'''
global(workDirectory="{work}" maxMessageSize="64k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{certs.ca}"
       defaultNetstreamDriverCertFile="{certs.server_cert}"
       defaultNetstreamDriverKeyFile="{certs.server_key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{out}" template="raw" flushOnTXEnd="on" asyncWriting="off")
''')
    log = folder / "rsyslogd.log"
    proc = subprocess.Popen([exe, "-n", "-f", str(conf), "-i", str(folder / "rsyslogd.pid")],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Rsyslog(proc, port, out, log)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited with {proc.returncode}: {log.read_text(errors='replace')}")
            try:
                wait_port(port, timeout=0.5)
                return server
            except TimeoutError:
                continue
        raise TimeoutError(f"rsyslogd did not listen: {log.read_text(errors='replace')}")
    except BaseException:
        server.stop()
        raise
