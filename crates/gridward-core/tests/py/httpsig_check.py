#!/usr/bin/env python3
"""Sign and verify HTTP Message Signatures (RFC 9421) with an independent implementation.

Used by crates/gridward-core/tests/httpsig_interop.rs. Needs the pip packages
``http-message-signatures`` (pyauth, 3.x) and ``requests``: its signer and verifier work on
``requests.PreparedRequest`` objects.

Reads one JSON object on stdin and writes one JSON object on stdout.

Modes (the only argument):
  verify  {"alg", "key_id", "public_key_pem", "method", "url", "headers": [[name, value], ...],
           "body", "required": [component, ...], "max_age_seconds"}
      Verifies the request's signature with HTTPMessageVerifier, requiring the components and
      checking the signed Content-Digest against the body. Prints
      {"label", "parameters", "covered", "nonce", "body_verified"}.
  sign    {"alg", "key_id", "private_key_pem", "method", "url", "headers", "body", "label",
           "components", "created", "expires", "nonce"}
      Signs the request with HTTPMessageSigner, which also writes Content-Digest (sha-256) for
      the body. Prints {"headers": [[name, value], ...]}: every header field of the request.

Exit codes: 0 done; 1 refused ("FAIL <reason>" on stderr); 2 usage; 3 a package is missing.
"""

import datetime
import json
import sys

INSTALL = "python3 -m pip install -r .ci/requirements.txt"

try:
    import requests
    from http_message_signatures import (
        HTTPMessageSignaturesException,
        HTTPMessageSigner,
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


def prepared_request(job):
    """The request as `requests` would send it (it adds Content-Length)."""
    request = requests.Request(
        job["method"],
        job["url"],
        data=job["body"].encode("utf-8"),
        headers={name: value for name, value in job["headers"]},
    )
    return request.prepare()


def timestamp(seconds):
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


def verify(job):
    request = prepared_request(job)
    resolver = MappingKeyResolver(
        public_keys={job["key_id"]: job["public_key_pem"].encode("ascii")}, private_keys={}
    )
    verifier = HTTPMessageVerifier(signature_algorithm=ALGORITHMS[job["alg"]], key_resolver=resolver)
    results = verifier.verify(
        request,
        max_age=datetime.timedelta(seconds=job["max_age_seconds"]),
        require_components=tuple(job["required"]),
        body=job["body"].encode("utf-8"),
    )
    result = results[0]
    return {
        "label": result.label,
        "parameters": result.parameters,
        "covered": [name for name in result.covered_components],
        "nonce": result.nonce,
        "body_verified": result.body is not None,
    }


def sign(job):
    request = prepared_request(job)
    resolver = MappingKeyResolver(
        public_keys={}, private_keys={job["key_id"]: job["private_key_pem"].encode("ascii")}
    )
    signer = HTTPMessageSigner(signature_algorithm=ALGORITHMS[job["alg"]], key_resolver=resolver)
    signer.sign(
        request,
        key_id=job["key_id"],
        created=timestamp(job["created"]),
        expires=timestamp(job["expires"]),
        nonce=job["nonce"],
        label=job["label"],
        covered_component_ids=tuple(job["components"]),
        body=job["body"].encode("utf-8"),
    )
    return {"headers": [[name, value] for name, value in request.headers.items()]}


def main(argv):
    modes = {"verify": verify, "sign": sign}
    if len(argv) != 1 or argv[0] not in modes:
        print(__doc__, file=sys.stderr)
        return 2
    job = json.load(sys.stdin)
    try:
        out = modes[argv[0]](job)
    except (InvalidSignature, HTTPMessageSignaturesException) as e:
        cause = f" ({type(e.__cause__).__name__})" if e.__cause__ is not None else ""
        print(f"FAIL {type(e).__name__}{cause}: {e}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
