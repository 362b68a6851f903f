#!/usr/bin/env bash
# Regenerates Sources/UserService/Generated from Protos/. Needs protoc (Debian protobuf-compiler)
# and the two plugins, built once from the swift-protobuf and grpc-swift-protobuf packages:
#   PROTOC_GEN_SWIFT=/path/protoc-gen-swift PROTOC_GEN_GRPC_SWIFT=/path/protoc-gen-grpc-swift-2 scripts/generate-protos.sh
# The generated files are committed, so neither a build nor CI needs the plugins.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PROTOC_GEN_SWIFT:?path to protoc-gen-swift}"
: "${PROTOC_GEN_GRPC_SWIFT:?path to protoc-gen-grpc-swift-2}"
out=Sources/UserService/Generated
tmp=$(mktemp -d)
protoc --plugin=protoc-gen-swift="$PROTOC_GEN_SWIFT" --plugin=protoc-gen-grpc-swift-2="$PROTOC_GEN_GRPC_SWIFT" \
  -I Protos --swift_out="$tmp" --swift_opt=Visibility=Public \
  --grpc-swift-2_out="$tmp" --grpc-swift-2_opt=Visibility=Public,Client=true,Server=true \
  Protos/demo/user.proto Protos/demo/echo.proto Protos/grpc/health/v1/health.proto
mkdir -p "$out"
cp "$tmp"/demo/*.swift "$tmp"/grpc/health/v1/*.swift "$out"/
rm -rf "$tmp"
