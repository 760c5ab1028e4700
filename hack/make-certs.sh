#!/usr/bin/env bash
# Make a CA, an xDS server certificate and node (client) certificates for xDS over mTLS.
#
#   hack/make-certs.sh DIR [--trust-domain DOMAIN] [--server-name NAME]... REGION/NODE_ID...
#
# DIR/ca.pem, DIR/ca.key            the CA (serve --xds-tls-client-ca DIR/ca.pem; Envoys
#                                   trust it for the server too: bootstrap --xds-tls-ca)
# DIR/server.pem, DIR/server.key    the server's (serve --xds-tls-cert/--xds-tls-key); its
#                                   names: 127.0.0.1, localhost and every --server-name
# DIR/REGION/NODE_ID.pem, .key      one per node (bootstrap --xds-tls-cert/--xds-tls-key),
#                                   identity spiffe://DOMAIN/region/REGION/node/NODE_ID as
#                                   its only URI SAN: the server checks that a node's
#                                   region and id are the ones its certificate names.
# Keys are P-256; certificates last 365 days (DAYS=N to change). Needs openssl.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
dir=$1; shift
domain=xds-server.local
names=(DNS:localhost IP:127.0.0.1)
nodes=()
while [ $# -gt 0 ]; do
  case $1 in
    --trust-domain) domain=$2; shift 2 ;;
    --server-name) names+=("DNS:$2"); shift 2 ;;
    -h|--help) usage ;;
    */*) nodes+=("$1"); shift ;;
    *) echo "make-certs: expected REGION/NODE_ID, got '$1'" >&2; exit 2 ;;
  esac
done
days=${DAYS:-365}
mkdir -p "$dir"
cd "$dir"

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

sign() {  # sign NAME SUBJECT EXTENSIONS
  local name=$1 subject=$2 ext=$3
  newkey "$name.key"
  openssl req -new -key "$name.key" -subj "$subject" -out "$name.csr" 2>/dev/null
  printf '%b' "$ext" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -days "$days" -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

if [ ! -f ca.pem ]; then
  newkey ca.key
  openssl req -x509 -new -key ca.key -subj "/CN=xds-server CA ($domain)" -days "$days" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -out ca.pem 2>/dev/null
fi
san=$(IFS=,; echo "${names[*]}")
sign server "/CN=xds-server" "subjectAltName=$san\nextendedKeyUsage=serverAuth\n"
for node in "${nodes[@]}"; do
  region=${node%%/*}; id=${node#*/}
  mkdir -p "$region"
  sign "$region/$id" "/CN=$id" \
    "subjectAltName=URI:spiffe://$domain/region/$region/node/$id\nextendedKeyUsage=clientAuth\n"
done
echo "certificates in $dir: ca.pem, server.pem, ${#nodes[@]} node(s)"
