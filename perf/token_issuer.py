#!/usr/bin/env python3
"""A docker token service for perf/world.sh: anonymous `pull` tokens, ES256 JWTs.

    token_issuer.py HOST:PORT KEY_PEM CERT_PEM ISSUER SERVICE [TLS_CERT TLS_KEY]

With TLS_CERT and TLS_KEY it answers over HTTPS (the far TLS world, where every hop is TLS).

`GET /token?service=SERVICE&scope=repository:NAME:pull[,push]` (any credentials, or none)
answers `{"token": JWT, "access_token": JWT, "expires_in": 300, "issued_at": ...}` granting
`pull` on every repository scope asked for. The JWT header carries the signing certificate
(`x5c`), which the registry checks against its `rootcertbundle` (CERT_PEM itself, a
self-signed P-256 certificate made by world.sh with openssl); `iss`/`aud` are ISSUER/SERVICE.
Like tests/it/support/token.rs, in python3 with python3-cryptography (Debian).
"""
import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class Issuer:
    def __init__(self, key_pem, cert_pem, issuer, service):
        self.key = serialization.load_pem_private_key(open(key_pem, "rb").read(), None)
        cert = x509.load_pem_x509_certificate(open(cert_pem, "rb").read())
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.issuer, self.service = issuer, service
        self.serial = 0
        self.lock = threading.Lock()

    def sign(self, access, lifetime=300):
        now = int(time.time())
        with self.lock:
            self.serial += 1
            jti = f"{time.time_ns()}-{self.serial}"
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": "", "aud": self.service, "exp": now + lifetime,
                  "nbf": now - 1, "iat": now, "jti": jti, "access": access}
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         b64url(json.dumps(claims, separators=(",", ":")).encode()))
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def access_for(scopes):
    access = []
    for scope in scopes:
        for one in scope.split(" "):
            parts = one.split(":")
            if len(parts) >= 3 and parts[0] == "repository":
                access.append({"type": "repository", "name": ":".join(parts[1:-1]), "actions": ["pull"]})
    return access


def main(argv):
    if len(argv) not in (5, 7):
        print(__doc__, file=sys.stderr)
        return 2
    host, port = argv[0].rsplit(":", 1)
    issuer = Issuer(*argv[1:5])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            u = urlparse(self.path)
            if u.path != "/token":
                return self._reply(404, {"error": "not found"})
            q = parse_qs(u.query)
            tok = issuer.sign(access_for(q.get("scope", [])))
            self._reply(200, {"token": tok, "access_token": tok, "expires_in": 300,
                              "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

        def do_POST(self):  # OAuth2 form (grant_type=password/refresh_token): same anonymous grant
            n = int(self.headers.get("Content-Length") or 0)
            q = parse_qs(self.rfile.read(n).decode())
            tok = issuer.sign(access_for(q.get("scope", [])))
            self._reply(200, {"token": tok, "access_token": tok, "expires_in": 300})

    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    if len(argv) == 7:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(argv[5], argv[6])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
