#!/usr/bin/env python3
"""A downstream receiver that checks Gridward's signed deliveries with an independent RFC 9421
implementation: the Python package ``http-message-signatures`` (pyauth, 3.x).

Used by crates/gridward/tests/it/downstream.rs. An HTTPS server (the ``ssl`` module, TLS with a
client certificate required and checked against --ca) on 127.0.0.1; every ``POST /readings`` is
verified with ``HTTPMessageVerifier``:

- the signature labelled ``gridward`` covers @method, @target-uri, content-digest and
  content-type, and carries created, expires, nonce, keyid and alg;
- keyid is one of the --key-id keys and alg is that key's algorithm (ed25519 or
  ecdsa-p256-sha256); the signature verifies with its public key;
- created is at most 300 s old (5 s leeway), expires has not passed;
- the signed Content-Digest matches the body (the verifier's ``body=`` check);
- the nonce was not seen before (replay).

A request that passes is answered 200 ``{"status":"verified"}``, any other 401
``{"error": ...}``. Each request appends one JSON line to --results:
``{"ok", "error", "reading_id", "keyid", "alg", "label", "covered", "nonce", "created",
"expires", "client_cn", "target_uri"}``.

Once listening, the port is written to --ready-file. Exit codes: 2 usage; 3 a package is
missing (``python3 -m pip install -r .ci/requirements.txt``).
"""

import argparse
import datetime
import http.server
import json
import os
import ssl
import sys
import threading

INSTALL = "python3 -m pip install -r .ci/requirements.txt"

try:
    import http_sf
    from cryptography import x509
    from http_message_signatures import (
        HTTPMessageSignaturesException,
        HTTPMessageVerifier,
        InvalidSignature,
        MappingKeyResolver,
        algorithms,
    )
except ImportError as e:
    print(f"ERROR missing Python package ({e}): run `{INSTALL}`", file=sys.stderr)
    sys.exit(3)

ALGORITHMS = {
    "ed25519": algorithms.ED25519,
    "ecdsa-p256-sha256": algorithms.ECDSA_P256_SHA256,
}
LABEL = "gridward"
REQUIRED = ("@method", "@target-uri", "content-digest", "content-type")
PARAMETERS = ("created", "expires", "nonce", "keyid", "alg")
MAX_AGE = datetime.timedelta(seconds=300)
MAX_BODY = 64 * 1024


class Refused(Exception):
    """A request that does not pass; the message is the reason."""


class Headers:
    """Header fields in the order received; ``items()`` is what the library reads."""

    def __init__(self, pairs):
        self._pairs = list(pairs)

    def items(self):
        return list(self._pairs)


class Message:
    """The request as the library's component resolver reads it."""

    def __init__(self, method, url, headers):
        self.method = method
        self.url = url
        self.headers = headers


def load_keys(specs):
    """``KEYID=ALG:CERT.pem`` → {keyid: (alg, public key)}."""
    keys = {}
    for spec in specs:
        key_id, _, rest = spec.partition("=")
        alg, _, path = rest.partition(":")
        if not key_id or alg not in ALGORITHMS or not path:
            raise SystemExit(f"bad --key-id {spec!r}: expected KEYID=ALG:CERT.pem, ALG one of {list(ALGORITHMS)}")
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        keys[key_id] = (alg, cert.public_key())
    return keys


def signature_key_id(headers):
    """The keyid of the signature labelled ``gridward`` (to pick the verifier's algorithm)."""
    values = [v for n, v in headers.items() if n.lower() == "signature-input"]
    if not values:
        raise Refused("no Signature-Input field")
    try:
        parsed = http_sf.parse(", ".join(values).encode(), tltype="dictionary")
    except (ValueError, TypeError) as e:
        raise Refused(f"Signature-Input is malformed: {e}") from e
    if LABEL not in parsed:
        raise Refused(f"no signature labelled {LABEL!r} (labels: {list(parsed)})")
    _member, params = parsed[LABEL]
    key_id = params.get("keyid")
    if not isinstance(key_id, str):
        raise Refused("the signature has no keyid")
    return key_id


class State:
    def __init__(self, keys, results_path):
        self.keys = keys
        self.results_path = results_path
        self.nonces = set()
        self.lock = threading.Lock()

    def record(self, entry):
        with self.lock:
            with open(self.results_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def check(self, message, body):
        """Verifies one request; returns the facts recorded about it."""
        key_id = signature_key_id(message.headers)
        if key_id not in self.keys:
            raise Refused(f"unknown keyid {key_id!r}")
        alg, public_key = self.keys[key_id]
        verifier = HTTPMessageVerifier(
            signature_algorithm=ALGORITHMS[alg],
            key_resolver=MappingKeyResolver(public_keys={key_id: public_key}, private_keys={}),
        )
        try:
            results = verifier.verify(
                message,
                max_age=MAX_AGE,
                require_components=REQUIRED,
                body=body,
            )
        except (InvalidSignature, HTTPMessageSignaturesException) as e:
            cause = f" ({type(e.__cause__).__name__})" if e.__cause__ is not None else ""
            raise Refused(f"{type(e).__name__}{cause}: {str(e) or 'the signature does not verify'}") from e
        if len(results) != 1:
            raise Refused(f"{len(results)} signatures verified, expected one")
        result = results[0]
        if result.label != LABEL:
            raise Refused(f"label {result.label!r} is not {LABEL!r}")
        missing = [p for p in PARAMETERS if p not in result.parameters]
        if missing:
            raise Refused(f"signature parameters missing: {missing}")
        if result.parameters["alg"] != alg:
            raise Refused(f"alg {result.parameters['alg']!r} is not the key's {alg!r}")
        if result.body is None:
            raise Refused("the body was not checked against a signed Content-Digest")
        with self.lock:
            if result.nonce in self.nonces:
                raise Refused(f"nonce {result.nonce!r} replayed")
            self.nonces.add(result.nonce)
        return {
            "keyid": key_id,
            "alg": result.parameters["alg"],
            "label": result.label,
            "covered": [c.strip('"') for c in result.covered_components if c != '"@signature-params"'],
            "nonce": result.nonce,
            "created": result.parameters["created"],
            "expires": result.parameters["expires"],
        }


def handler_class(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            sys.stderr.write("pysink: %s - %s\n" % (self.address_string(), fmt % args))

        def answer(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.answer(405, {"error": "method_not_allowed"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.answer(413, {"error": "body_too_large"})
                return
            body = self.rfile.read(length)
            host = self.headers.get("Host", "")
            url = f"https://{host}{self.path}"
            entry = {"ok": False, "error": None, "target_uri": url, "client_cn": client_cn(self.connection)}
            try:
                entry["reading_id"] = json.loads(body).get("ReadingID")
            except (ValueError, AttributeError):
                entry["reading_id"] = None
            try:
                if self.path != "/readings":
                    raise Refused(f"path {self.path!r} is not /readings")
                message = Message(self.command, url, Headers(self.headers.items()))
                entry.update(state.check(message, body))
                entry["ok"] = True
            except Refused as e:
                entry["error"] = str(e)
            state.record(entry)
            if entry["ok"]:
                self.answer(200, {"status": "verified", "reading_id": entry["reading_id"]})
            else:
                self.log_message("refused: %s", entry["error"])
                self.answer(401, {"error": entry["error"]})

    return Handler


def client_cn(connection):
    try:
        cert = connection.getpeercert()
    except (ValueError, AttributeError):
        return None
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cert", required=True, help="server certificate chain (PEM)")
    p.add_argument("--key", required=True, help="its private key (PEM)")
    p.add_argument("--ca", required=True, help="trust anchors for client certificates (PEM)")
    p.add_argument("--key-id", action="append", default=[], required=True, help="KEYID=ALG:CERT.pem")
    p.add_argument("--ready-file", required=True)
    p.add_argument("--results", required=True)
    args = p.parse_args()

    state = State(load_keys(args.key_id), args.results)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(cafile=args.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class(state))
    server.daemon_threads = True
    # The handshake runs in the request's thread, on its first read: a client that fails it
    # does not hold up the others.
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    port = server.server_address[1]
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{port}\n")
    os.rename(tmp, args.ready_file)
    print(f"pysink: listening on https://127.0.0.1:{port}/readings", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
