#!/usr/bin/env python3
"""Sign requests with an independent RFC 9421 implementation (the Python package
``http-message-signatures``, pyauth, 3.x) and post them to a Gridward sink with ``requests`` over
mutual TLS.

Used by crates/gridward/tests/it/downstream.rs. The only argument is a file holding one JSON
object:

  {"url", "ca", "cert", "key",                      # TLS: trust anchors, client chain and key
   "signing_key", "key_id", "alg",                  # RFC 9421: PKCS#8 PEM key, keyid, algorithm
   "requests": [{"body", "nonce", "tamper_body", "send_twice"}, ...]}

Each request is ``POST url`` with ``Content-Type: application/json`` and the body, signed with
label ``gridward`` over @method, @target-uri, content-digest and content-type with created (now),
expires (now + 60 s), nonce, keyid and alg; the library writes Content-Digest (sha-256) for the
body. With ``tamper_body`` the body is replaced after signing (same signature and digest). With
``send_twice`` the identical signed request is sent a second time.

Writes one JSON object on stdout: {"results": [{"status", "answer", "again": {"status",
"answer"} | null}, ...]}.

Exit codes: 0 done (whatever the answers); 2 usage; 3 a package is missing (``python3 -m pip
install -r .ci/requirements.txt``).
"""

import datetime
import json
import sys

INSTALL = "python3 -m pip install -r .ci/requirements.txt"

try:
    import requests
    from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms
except ImportError as e:
    print(f"ERROR missing Python package ({e}): run `{INSTALL}`", file=sys.stderr)
    sys.exit(3)

ALGORITHMS = {
    "ed25519": algorithms.ED25519,
    "ecdsa-p256-sha256": algorithms.ECDSA_P256_SHA256,
}
COMPONENTS = ("@method", "@target-uri", "content-digest", "content-type")


def send(session, prepared, job):
    response = session.send(prepared, cert=(job["cert"], job["key"]), verify=job["ca"], timeout=30)
    return {"status": response.status_code, "answer": response.text}


def main(argv):
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    with open(job["signing_key"], "rb") as f:
        private_key = f.read()
    signer = HTTPMessageSigner(
        signature_algorithm=ALGORITHMS[job["alg"]],
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={job["key_id"]: private_key}),
    )
    results = []
    with requests.Session() as session:
        for r in job["requests"]:
            body = r["body"].encode("utf-8")
            prepared = requests.Request(
                "POST", job["url"], data=body, headers={"Content-Type": "application/json"}
            ).prepare()
            created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
            signer.sign(
                prepared,
                key_id=job["key_id"],
                created=created,
                expires=created + datetime.timedelta(seconds=60),
                nonce=r["nonce"],
                label="gridward",
                covered_component_ids=COMPONENTS,
                body=body,
            )
            if r.get("tamper_body"):
                tampered = body.replace(b'"EnergyConsumed":', b'"EnergyConsumed":9')
                assert tampered != body, "nothing to tamper with"
                prepared.body = tampered
                prepared.headers["Content-Length"] = str(len(tampered))
            result = send(session, prepared, job)
            result["again"] = send(session, prepared, job) if r.get("send_twice") else None
            result["headers"] = dict(prepared.headers)
            results.append(result)
    json.dump({"results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
