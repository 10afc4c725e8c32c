#!/usr/bin/env bash
# Envelope verifications per second on one core, per algorithm, next to `openssl speed` for the
# same primitive measured in the same run, with the ratio. Prints a table; asserts nothing.
#
#   scripts/bench-verify.sh            # about two minutes
set -euo pipefail
cd "$(dirname "$0")/.."
core=${BENCH_CORE:-0}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "building the benchmark..." >&2
cargo bench -p gridward-core --bench verify --no-run --locked >&2 2>&1 | tail -1 >&2
echo "running criterion (gridward) on core $core..." >&2
taskset -c "$core" cargo bench -p gridward-core --bench verify --locked -- --output-format bencher 2>/dev/null \
    | grep '^test ' > "$out/gridward.txt"
echo "running openssl speed on core $core..." >&2
taskset -c "$core" openssl speed -seconds 5 ecdsap256 ed25519 rsa2048 > "$out/openssl.txt" 2>/dev/null

python3 - "$out/gridward.txt" "$out/openssl.txt" <<'PY'
import re, sys
gw = {}
for line in open(sys.argv[1]):
    m = re.match(r"test (\S+)/(\S+) \.\.\. bench:\s+([\d,]+) ns/iter", line)
    if m:
        gw[(m.group(1), m.group(2))] = 1e9 / int(m.group(3).replace(",", ""))
ossl = {}
text = open(sys.argv[2]).read()
m = re.search(r"rsa 2048 bits\s+\S+\s+\S+\s+\S+\s+([\d.]+)", text)
if m: ossl["rs256"] = float(m.group(1))
m = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+\S+\s+([\d.]+)", text)
if m: ossl["es256"] = float(m.group(1))
m = re.search(r"253 bits EdDSA \(Ed25519\)\s+\S+\s+\S+\s+\S+\s+([\d.]+)", text)
if m: ossl["eddsa"] = float(m.group(1))
print(f"{'alg':6} {'envelope verify/s':>18} {'primitive verify/s':>19} {'openssl verify/s':>17} {'envelope/openssl':>17}")
for alg in ("es256", "eddsa", "rs256"):
    e = gw.get(("envelope_verify", alg)); p = gw.get(("primitive_verify", alg)); o = ossl.get(alg)
    ratio = f"{e / o:.2f}" if e and o else "n/a"
    print(f"{alg:6} {e or 0:18.0f} {p or 0:19.0f} {o or 0:17.0f} {ratio:>17}")
PY
