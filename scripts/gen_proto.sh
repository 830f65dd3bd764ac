#!/usr/bin/env bash
# Regenerate src/splitlora/transport/splitlora_pb2{,_grpc}.py from splitlora.proto.
# Needs grpcio-tools (pip install -e '.[test]'). The generated modules are committed; rerun this
# after editing the .proto, and bump PROTOCOL_VERSION in transport/wire.py for incompatible changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DIR=src/splitlora/transport
"$PY" -m grpc_tools.protoc -I "$DIR" --python_out="$DIR" --grpc_python_out="$DIR" "$DIR/splitlora.proto"
# protoc writes `import splitlora_pb2`; inside the package it must be a relative import.
sed -i 's/^import splitlora_pb2 as splitlora__pb2$/from . import splitlora_pb2 as splitlora__pb2/' \
    "$DIR/splitlora_pb2_grpc.py"
grep -q '^from \. import splitlora_pb2 as splitlora__pb2$' "$DIR/splitlora_pb2_grpc.py"
"$PY" -c "import splitlora.transport.splitlora_pb2_grpc"  # imports with the installed runtime
echo "regenerated $DIR/splitlora_pb2.py and $DIR/splitlora_pb2_grpc.py"
