#!/usr/bin/env python3
"""Check Gridward envelopes (docs/wire-format.md) with pycose, an independent COSE library.

Used by crates/gridward-core/tests/interop.rs. Needs the pip packages ``pycose`` (which brings
``cryptography`` and ``cbor2``).

Modes:
  verify <envelope-file> <topic> <public-key-pem>
      Decodes the tagged COSE_Sign1 with pycose, checks the headers Gridward requires and verifies
      the signature with the topic as external AAD. Prints
      "OK alg=<name> meter=<id> counter=<n> timestamp=<t> content_type=<ct>" and exits 0, or prints
      "FAIL <reason>" on stderr and exits 1 (2 for usage errors).
  sign <private-key-pem> <meter> <counter> <timestamp> <topic> <content-type> <payload-file> <out>
      Writes an envelope made by pycose exactly as the spec says.
"""

import hashlib
import sys

INSTALL = "pip install pycose 'cbor2<6'"

try:
    import cbor2
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from pycose import algorithms, headers
    from pycose.keys import EC2Key, OKPKey, RSAKey
    from pycose.keys.curves import P256, Ed25519
    from pycose.messages import Sign1Message
except ImportError as e:
    print(f"ERROR missing Python package ({e}): {INSTALL}", file=sys.stderr)
    sys.exit(3)

# cbor2 6 decodes arrays as tuples, which pycose 1.1 refuses ("Bytes cannot be decoded as COSE
# message", pycose issue #141). Say so instead of failing obscurely.
if not isinstance(cbor2.loads(bytes.fromhex("d28100")).value, list):
    print(f"ERROR this cbor2 decodes arrays as tuples, which pycose cannot read: {INSTALL}", file=sys.stderr)
    sys.exit(3)

LABEL_METER_ID = -65537
LABEL_COUNTER = -65538
LABEL_TIMESTAMP = -65539
CRIT = [LABEL_METER_ID, LABEL_COUNTER, LABEL_TIMESTAMP]
CONTENT_TYPES = ("application/xml", "application/json")
KID_LEN = 16


class Refused(Exception):
    """The envelope does not conform or does not verify."""


def be(n, length=None):
    """Big-endian bytes of a non-negative integer."""
    if length is None:
        length = max(1, (n.bit_length() + 7) // 8)
    return n.to_bytes(length, "big")


def key_id(public_key):
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()[:KID_LEN]


def cose_public_key(public_key):
    """The pycose key and algorithm for a `cryptography` public key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise Refused(f"EC curve {public_key.curve.name} is not P-256")
        nums = public_key.public_numbers()
        return EC2Key(crv=P256, x=be(nums.x, 32), y=be(nums.y, 32)), algorithms.Es256
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return OKPKey(crv=Ed25519, x=raw), algorithms.EdDSA
    if isinstance(public_key, rsa.RSAPublicKey):
        nums = public_key.public_numbers()
        return RSAKey(n=be(nums.n), e=be(nums.e)), algorithms.RsaPkcs1Sha256
    raise Refused(f"unsupported key type {type(public_key).__name__}")


def cose_private_key(private_key):
    """The pycose key and algorithm for a `cryptography` private key."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise Refused(f"EC curve {private_key.curve.name} is not P-256")
        nums = private_key.private_numbers()
        pub = nums.public_numbers
        key = EC2Key(crv=P256, x=be(pub.x, 32), y=be(pub.y, 32), d=be(nums.private_value, 32))
        return key, algorithms.Es256
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        d = private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        x = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return OKPKey(crv=Ed25519, x=x, d=d), algorithms.EdDSA
    if isinstance(private_key, rsa.RSAPrivateKey):
        nums = private_key.private_numbers()
        pub = nums.public_numbers
        key = RSAKey(
            n=be(pub.n), e=be(pub.e), d=be(nums.d), p=be(nums.p), q=be(nums.q),
            dp=be(nums.dmp1), dq=be(nums.dmq1), qinv=be(nums.iqmp),
        )
        return key, algorithms.RsaPkcs1Sha256
    raise Refused(f"unsupported key type {type(private_key).__name__}")


def verify(envelope_path, topic, public_key_path):
    with open(public_key_path, "rb") as f:
        public_key = serialization.load_pem_public_key(f.read())
    key, expected_alg = cose_public_key(public_key)
    with open(envelope_path, "rb") as f:
        data = f.read()

    # pycose decodes tagged messages only (the spec's normal form).
    msg = Sign1Message.decode(data)
    if msg.uhdr:
        raise Refused(f"unprotected header is not empty: {msg.uhdr}")
    phdr = msg.phdr
    alg = phdr.get(headers.Algorithm)
    if alg is not expected_alg:
        raise Refused(f"alg {alg} is not the key's {expected_alg.fullname}")
    if phdr.get(headers.Critical) != CRIT:
        raise Refused(f"crit is {phdr.get(headers.Critical)}, expected {CRIT}")
    content_type = phdr.get(headers.ContentType)
    if content_type not in CONTENT_TYPES:
        raise Refused(f"content type {content_type!r}")
    kid = phdr.get(headers.KID)
    if kid != key_id(public_key):
        raise Refused(f"kid {kid!r} is not the key's {key_id(public_key).hex()}")
    for label in CRIT:
        if label not in phdr:
            raise Refused(f"protected header lacks private label {label}")
    meter, counter, timestamp = (phdr[LABEL_METER_ID], phdr[LABEL_COUNTER], phdr[LABEL_TIMESTAMP])
    if not isinstance(meter, str):
        raise Refused(f"meter id {meter!r} is not a text string")
    if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
        raise Refused(f"counter {counter!r} is not an unsigned integer")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise Refused(f"timestamp {timestamp!r} is not an integer")
    expected_labels = {headers.Algorithm, headers.Critical, headers.ContentType, headers.KID, *CRIT}
    extra = set(phdr) - expected_labels
    if extra:
        raise Refused(f"unexpected protected header labels {extra}")

    msg.external_aad = topic.encode("utf-8")
    msg.key = key
    if not msg.verify_signature():
        raise Refused("BAD SIGNATURE")
    print(
        f"OK alg={alg.fullname} meter={meter} counter={counter} timestamp={timestamp} "
        f"content_type={content_type}"
    )


def sign(private_key_path, meter, counter, timestamp, topic, content_type, payload_path, out_path):
    with open(private_key_path, "rb") as f:
        private_key = serialization.load_pem_private_key(f.read(), password=None)
    key, alg = cose_private_key(private_key)
    with open(payload_path, "rb") as f:
        payload = f.read()
    # Insertion order is encoding order: 1, 2, 3, 4, -65537, -65538, -65539, as Gridward writes it.
    phdr = {
        headers.Algorithm: alg,
        headers.Critical: list(CRIT),
        headers.ContentType: content_type,
        headers.KID: key_id(private_key.public_key()),
        LABEL_METER_ID: meter,
        LABEL_COUNTER: int(counter),
        LABEL_TIMESTAMP: int(timestamp),
    }
    msg = Sign1Message(phdr=phdr, uhdr={}, payload=payload, external_aad=topic.encode("utf-8"), key=key)
    with open(out_path, "wb") as f:
        f.write(msg.encode(tag=True))


def main(argv):
    if len(argv) == 4 and argv[0] == "verify":
        run, args = verify, argv[1:]
    elif len(argv) == 9 and argv[0] == "sign":
        run, args = sign, argv[1:]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        run(*args)
    except Refused as e:
        print(f"FAIL {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
