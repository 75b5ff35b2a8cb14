#!/usr/bin/env bash
# Makes the TLS material of the terminal bridges: one private CA, and one server certificate
# per Windows host running `execution-worker bridge-serve`.
#
#   deploy/windows/make-bridge-certs.sh OUT_DIR NAME [SAN ...]
#
#   OUT_DIR  where to write; the CA (ca.pem, ca.key) is created there on first use and
#            reused after, so run it once per bridge host with the same OUT_DIR
#   NAME     the host name the workers use in MT5_SESSIONS' address (the certificate's CN
#            and first subjectAltName: the workers check it)
#   SAN      more names or IP addresses the workers may use for this host
#
# Writes OUT_DIR/NAME.pem (certificate) and OUT_DIR/NAME.key (its key, mode 0600).
# Copy NAME.pem and NAME.key to that Windows host only; give ca.pem (never ca.key) to the
# workers (tls_ca in the sessions file). Keep ca.key offline.
#
# Needs openssl (Linux, macOS, or Git for Windows' bash). EC P-256 keys; certificates valid
# for CA_DAYS (default 1825) and CERT_DAYS (default 397) days: renew before then.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
out=$1
name=$2
shift 2
CA_DAYS=${CA_DAYS:-1825}
CERT_DAYS=${CERT_DAYS:-397}
umask 077
mkdir -p "$out"

if [ ! -f "$out/ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$out/ca.key" -out "$out/ca.pem" -days "$CA_DAYS" \
    -subj "/CN=mt5-bridge-ca" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 644 "$out/ca.pem"
  echo "make-bridge-certs: new CA $out/ca.pem (keep $out/ca.key offline)" >&2
fi

sans="DNS:$name"
for san in "$@"; do
  if [[ $san =~ ^[0-9.]+$ || $san == *:* ]]; then sans+=",IP:$san"; else sans+=",DNS:$san"; fi
done

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$out/$name.key" -out "$out/$name.csr" -subj "/CN=$name" 2>/dev/null
extensions=$(mktemp)
trap 'rm -f "$extensions" "$out/$name.csr"' EXIT
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
  "$sans" >"$extensions"
openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
  -CAcreateserial -days "$CERT_DAYS" -sha256 -extfile "$extensions" \
  -out "$out/$name.pem" 2>/dev/null
chmod 600 "$out/$name.key"
chmod 644 "$out/$name.pem"
openssl verify -CAfile "$out/ca.pem" "$out/$name.pem" >/dev/null
echo "make-bridge-certs: $out/$name.pem ($sans), key $out/$name.key" >&2
