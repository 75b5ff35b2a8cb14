#!/usr/bin/env bash
# Makes the mutual-TLS material of the terminal bridges: one private CA, one server
# certificate per bridge (per Windows host running `execution-worker bridge-serve`), one
# client certificate per worker deployment, and the CA's certificate revocation list.
#
#   make-bridge-certs.sh [server] OUT_DIR NAME [SAN ...]   a bridge's server certificate
#   make-bridge-certs.sh client OUT_DIR NAME               a worker deployment's certificate
#   make-bridge-certs.sh revoke OUT_DIR CERT.pem           revoke CERT, write a new crl.pem
#                                                          (REASON=keyCompromise|superseded|...)
#   make-bridge-certs.sh crl OUT_DIR                       re-sign crl.pem (before it expires)
#
#   OUT_DIR  where to write; the CA (ca.pem, ca.key) and an empty crl.pem are created there
#            on first use and reused after: use the same OUT_DIR for every certificate
#   NAME     server: the host name the workers use in their bridge address (CN and first
#            subjectAltName: the workers check it); client: the deployment's name, CN=NAME,
#            which the bridges list with --tls-allow CN=NAME
#   SAN      more names or IP addresses the workers may use for this bridge host
#
# Writes OUT_DIR/NAME.pem + NAME.key (server, extendedKeyUsage serverAuth) or
# OUT_DIR/clients/NAME.pem + NAME.key (client, clientAuth), keys mode 0600. A bridge host
# gets its NAME.pem/.key, ca.pem and crl.pem; a worker deployment its clients/NAME.pem/.key,
# ca.pem and crl.pem. Never copy ca.key: keep it offline. Running it again for a NAME renews
# the certificate (new key) and keeps the replaced one as NAME.previous.pem, for `revoke`.
#
# Needs openssl (Linux, macOS, or Git for Windows' bash). EC P-256 keys. Validity: CA_DAYS
# (default 1825), CERT_DAYS (server and client certificates, default 397), CRL_DAYS (the
# CRL's nextUpdate, default 30: after it every certificate is refused, so re-sign monthly).
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

kind=server
case ${1:-} in
  server | client | revoke | crl) kind=$1; shift ;;
esac
if [ $# -lt 1 ] || { [ "$kind" != crl ] && [ $# -lt 2 ]; }; then usage; fi
out=$1
shift
CA_DAYS=${CA_DAYS:-1825}
CERT_DAYS=${CERT_DAYS:-397}
CRL_DAYS=${CRL_DAYS:-30}
umask 077
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# `openssl ca` keeps the revocation database (index.txt) and signs the CRL
ca_config() {
  cat >"$scratch/ca.cnf" <<EOF
[ ca ]
default_ca = bridge_ca
[ bridge_ca ]
database = $out/index.txt
crlnumber = $out/crlnumber
certificate = $out/ca.pem
private_key = $out/ca.key
default_md = sha256
default_crl_days = $CRL_DAYS
crl_extensions = crl_ext
[ crl_ext ]
authorityKeyIdentifier = keyid:always
EOF
  [ -f "$out/index.txt" ] || : >"$out/index.txt"
  [ -f "$out/crlnumber" ] || echo 1000 >"$out/crlnumber"
}

sign_crl() {
  ca_config
  openssl ca -config "$scratch/ca.cnf" -gencrl -out "$out/crl.pem" 2>/dev/null
  chmod 644 "$out/crl.pem"
  echo "make-bridge-certs: $out/crl.pem signed, valid $CRL_DAYS days: copy it to every bridge and worker" >&2
}

need_ca() {
  if [ ! -f "$out/ca.key" ]; then
    echo "make-bridge-certs: no CA in $out (make a certificate first)" >&2
    exit 1
  fi
}

if [ ! -f "$out/ca.key" ] && { [ "$kind" = server ] || [ "$kind" = client ]; }; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$out/ca.key" -out "$out/ca.pem" -days "$CA_DAYS" \
    -subj "/CN=mt5-bridge-ca" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 644 "$out/ca.pem"
  echo "make-bridge-certs: new CA $out/ca.pem (keep $out/ca.key offline)" >&2
  sign_crl
fi

case $kind in
  crl)
    need_ca
    sign_crl
    exit 0
    ;;
  revoke)
    need_ca
    cert=$1
    # signed by this CA? (an expired certificate can still be revoked)
    if ! openssl verify -CAfile "$out/ca.pem" -no_check_time "$cert" >/dev/null 2>&1; then
      echo "make-bridge-certs: $cert was not issued by $out/ca.pem" >&2
      exit 1
    fi
    ca_config
    if ! output=$(openssl ca -config "$scratch/ca.cnf" -revoke "$cert" \
      -crl_reason "${REASON:-unspecified}" 2>&1); then
      case $output in
        *"Already revoked"*) ;;
        *) echo "$output" >&2; exit 1 ;;
      esac
    fi
    echo "make-bridge-certs: revoked $(openssl x509 -in "$cert" -noout -subject -serial | tr '\n' ' ')" >&2
    sign_crl
    exit 0
    ;;
esac

name=$1
shift
if [[ ! $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$ ]]; then
  echo "make-bridge-certs: NAME must be letters, digits, '.', '_' or '-'" >&2
  exit 2
fi

if [ "$kind" = client ]; then
  dir="$out/clients"
  mkdir -p "$dir"
  chmod 755 "$dir"
  extensions="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
  sans="CN=$name"
else
  dir="$out"
  sans="DNS:$name"
  for san in "$@"; do
    if [[ $san =~ ^[0-9.]+$ || $san == *:* ]]; then sans+=",IP:$san"; else sans+=",DNS:$san"; fi
  done
  extensions="subjectAltName=$sans
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
fi

# renewing: keep the certificate being replaced, to revoke it once the new one is in place
if [ -f "$dir/$name.pem" ]; then
  cp "$dir/$name.pem" "$dir/$name.previous.pem"
  echo "make-bridge-certs: the previous certificate is $dir/$name.previous.pem (revoke it after the switch)" >&2
fi
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$dir/$name.key" -out "$scratch/$name.csr" -subj "/CN=$name" 2>/dev/null
printf '%s\n' "$extensions" >"$scratch/extensions"
openssl x509 -req -in "$scratch/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
  -CAcreateserial -days "$CERT_DAYS" -sha256 -extfile "$scratch/extensions" \
  -out "$dir/$name.pem" 2>/dev/null
chmod 600 "$dir/$name.key"
chmod 644 "$dir/$name.pem"
openssl verify -CAfile "$out/ca.pem" "$dir/$name.pem" >/dev/null
echo "make-bridge-certs: $kind $dir/$name.pem ($sans), key $dir/$name.key" >&2
