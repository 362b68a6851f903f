#!/usr/bin/env bash
# Makes test certificates with openssl, as in the recipe of a CA signing a server certificate:
# a CA (ca.crt, ca.key), a server certificate for the given names (server.crt, server.key) with
# the subjectAltName that browsers and gRPC clients require, and a client certificate
# (client.crt, client.key) for mutual TLS. Run it again on the same directory to sign more
# certificates with the same CA. Keys are not encrypted: these are for tests and trials.
#
#   scripts/gen-certs.sh                                  # ./certs, server for localhost and 127.0.0.1
#   scripts/gen-certs.sh -o /tmp/c --server demo.kubesre.com,localhost,127.0.0.1
#   scripts/gen-certs.sh -o /tmp/c --server-out api --server api.example.com --client none
#   scripts/gen-certs.sh -o /tmp/c --server none --client-out old --expired
set -euo pipefail

out=certs
server_names=localhost,127.0.0.1
server_out=server
client_name=client
client_out=client
days=825
expired=0
ca_subject="/C=CN/ST=shanghai/L=shanghai/O=grpc-web-proxy test CA/CN=grpc-web-proxy test CA"

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'USAGE'

options:
  -o, --out DIR        where the files go (default: ./certs)
  --server NAMES       comma-separated DNS names and IP addresses of the server certificate
                       (default: localhost,127.0.0.1); 'none' makes no server certificate
  --server-out NAME    base name of the server files (default: server -> server.crt, server.key)
  --client CN          common name of the client certificate (default: client); 'none' for none
  --client-out NAME    base name of the client files (default: client)
  --ca-subject SUBJ    subject of a new CA (default: a test CA)
  --days N             validity of the new certificates in days (default: 825)
  --expired            make the new server and client certificates already expired
USAGE
}

while [ $# -gt 0 ]; do
  case "$1" in
    -o|--out) out=$2; shift 2 ;;
    --server) server_names=$2; shift 2 ;;
    --server-out) server_out=$2; shift 2 ;;
    --client) client_name=$2; shift 2 ;;
    --client-out) client_out=$2; shift 2 ;;
    --ca-subject) ca_subject=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --expired) expired=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gen-certs.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

command -v openssl >/dev/null || { echo "gen-certs.sh: openssl is needed" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
umask 077
leaf_days=$days
# openssl x509 -days -1 ends the validity a day before now: an expired certificate.
[ "$expired" = 1 ] && leaf_days=-1

# The CA: a 4096-bit key and a self-signed certificate with the v3_ca extensions.
if [ ! -f ca.key ] || [ ! -f ca.crt ]; then
  openssl genrsa -out ca.key 4096 2>/dev/null
  openssl req -new -x509 -days 3650 -sha256 -extensions v3_ca -key ca.key -out ca.crt -subj "$ca_subject"
  echo "made $out/ca.crt (CA) and $out/ca.key"
fi

# sign NAME CN EXTENSIONS: a 2048-bit key, a signing request, and the certificate signed by the CA.
sign() {
  local name=$1 cn=$2 extensions=$3
  openssl genrsa -out "$name.key" 2048 2>/dev/null
  openssl req -new -key "$name.key" -out "$name.csr" -subj "/C=CN/ST=shanghai/L=shanghai/O=grpc-web-proxy/CN=$cn"
  printf '%s\n' "$extensions" > "$name.ext"
  openssl x509 -req -days "$leaf_days" -sha256 -CA ca.crt -CAkey ca.key -CAcreateserial \
    -in "$name.csr" -out "$name.crt" -extfile "$name.ext" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
  chmod 644 "$name.crt" ca.crt
  echo "made $out/$name.crt and $out/$name.key ($(openssl x509 -in "$name.crt" -noout -enddate))"
}

if [ "$server_names" != none ]; then
  san=""
  IFS=, read -r -a names <<< "$server_names"
  for n in "${names[@]}"; do
    if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
  done
  sign "$server_out" "${names[0]}" "basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=${san%,}"
fi

if [ "$client_name" != none ]; then
  sign "$client_out" "$client_name" "basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
subjectAltName=DNS:$client_name"
fi
